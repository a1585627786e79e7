// Scalar math shared by the CPU (C++17) and CUDA kernels. Only inline functions on floats:
// no memory layout, no launch code. Everything here is exercised by the CPU kernels' tests.
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
ONESTEP_HD float modulate(float xhat, float shift, float scale) {
  return fmaf(xhat, 1.0f + scale, shift);
}

// Reciprocal standard deviation from a (biased) variance, as torch.layer_norm computes it.
ONESTEP_HD float layernorm_rstd(float var, float eps) { return 1.0f / sqrtf(var + eps); }

// Running mean / sum of squared deviations (Welford), mergeable across threads and warps.
struct Welford {
  float mean;
  float m2;
  float count;
};

ONESTEP_HD Welford welford_push(Welford a, float x) {
  a.count += 1.0f;
  const float delta = x - a.mean;
  a.mean += delta / a.count;
  a.m2 += delta * (x - a.mean);
  return a;
}

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

}  // namespace
}  // namespace onestep
