// Scalar math shared by the CPU (C++17) and CUDA kernels. Only inline functions on floats:
// no memory layout, no launch code. Everything here is exercised by the CPU kernels' tests,
// or (the Welford merge, which only the CUDA kernels run) by tests/test_native_math.py.
// Internal linkage (anonymous namespace): the CPU kernels are compiled once per instruction
// set, and a shared out-of-line copy could hand AVX2 code to the portable variant.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ONESTEP_HD __host__ __device__ __forceinline__
#else
#define ONESTEP_HD inline
#endif

namespace onestep {
namespace {

// adaLN modulation of a normalised value: xhat * (1 + scale) + shift.
// (Plain a * b + c throughout, not fmaf: compilers contract it to an FMA where the target has
// one, and fmaf would be a library call, which blocks vectorisation, where it has not.)
ONESTEP_HD float modulate(float xhat, float shift, float scale) {
  return xhat * (1.0f + scale) + shift;
}

// Reciprocal standard deviation from a (biased) variance, as torch.layer_norm computes it.
ONESTEP_HD float layernorm_rstd(float var, float eps) { return 1.0f / sqrtf(var + eps); }

// A mean and sum of squared deviations over `count` values (Welford's state), mergeable
// across threads and warps.
struct Welford {
  float mean;
  float m2;
  float count;
};

// Chan et al.'s parallel merge; an empty side (count 0) leaves the other unchanged.
ONESTEP_HD Welford welford_merge(Welford a, Welford b) {
  const float count = a.count + b.count;
  if (count == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.count / count;
  Welford r;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
  r.count = count;
  return r;
}

// Gradient of LayerNorm (no affine) for one element. g is the upstream gradient times the
// affine factor (dy * (1 + scale)); mean_g and mean_gxhat are row means of g and g * xhat.
ONESTEP_HD float layernorm_dx(float g, float xhat, float mean_g, float mean_gxhat, float rstd) {
  return rstd * (g - mean_g - xhat * mean_gxhat);
}

// ---- GELU with the tanh approximation --------------------------------------------------
// gelu(u) = 0.5 u (1 + tanh(z)) = u * sigmoid(2 z),  z = sqrt(2/pi) (u + 0.044715 u^3).
// exp_poly is a vectorisable expf (Cephes' range reduction and degree-6 polynomial, ~1 ulp
// on the clamped range); NaN passes through the comparisons unchanged.
constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluC = 0.044715f;

// e^x for x already within [-87.34, 88.38] (no clamping, no overflow check): the range
// reduction and polynomial that exp_poly and the CPU attention's softmax share.
ONESTEP_HD float exp_in_range(float xc) {
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
#endif
  return p * scale;
}

// Written without branches (selects only) so that loops over it vectorise.
ONESTEP_HD float exp_poly(float x) {
  const float lo = -87.3365447505531f, hi = 88.3762626647949f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);  // NaN compares false and passes through
  return x > hi ? INFINITY : exp_in_range(xc);
}

// sigmoid(2 z) for the pre-activation u.
ONESTEP_HD float gelu_tanh_gate(float u) {
  const float z = kGeluK * (kGeluC * u * u * u + u);
  return 1.0f / (1.0f + exp_poly(-2.0f * z));
}

ONESTEP_HD float gelu_tanh(float u) { return u * gelu_tanh_gate(u); }

// d gelu / du = s + u s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 u^2), s = gelu_tanh_gate(u).
// Where s saturates (s (1 - s) == 0) the second term is 0, also for |u| large enough that
// u^2 overflows.
ONESTEP_HD float gelu_tanh_grad(float u, float s) {
  const float t = s * (1.0f - s);
  const float slope = 2.0f * kGeluK * (3.0f * kGeluC * u * u + 1.0f);
  return t == 0.0f ? s : u * t * slope + s;
}

// ---- Noise screening (score_candidates) ---------------------------------------------------
// The order of a condition's candidates: a higher score first, equal scores by the lower
// index, NaN read as -inf, so that every backend picks the same candidates.
ONESTEP_HD float screening_value(float score) { return score != score ? -INFINITY : score; }

ONESTEP_HD bool ranks_before(float value_a, long long index_a, float value_b, long long index_b) {
  return value_a > value_b || (value_a == value_b && index_a < index_b);
}

// A running log-sum-exp: the largest value seen and the sum of exp(value - max); empty: sum 0.
struct LogSumExp {
  float max;
  float sum;
};

ONESTEP_HD LogSumExp lse_merge(LogSumExp a, LogSumExp b) {
  if (a.sum == 0.0f) return b;
  if (b.sum == 0.0f) return a;
  const float top = a.max > b.max ? a.max : b.max;
  LogSumExp r;
  r.max = top;
  r.sum = a.sum * expf(a.max - top) + b.sum * expf(b.max - top);
  return r;
}

ONESTEP_HD LogSumExp lse_push(LogSumExp a, float x) {
  if (x == -INFINITY) return a;
  LogSumExp one;
  one.max = x;
  one.sum = 1.0f;
  return lse_merge(a, one);
}

// The cosine of two pooled vectors from their dot product and squared norms (|p| |q| floored
// at 1e-8, as the Triton kernel and the reference floor it).
ONESTEP_HD float cosine_score(float dot, float pp, float qq) {
  const float norms = pp * qq;
  return dot / sqrtf(norms > 1e-16f ? norms : 1e-16f);
}

}  // namespace
}  // namespace onestep
