// LayerNorm (no affine, fp32 statistics) followed by adaLN modulation, forward and backward.
// Compiled once per instruction set: ONESTEP_ISA names the namespace (base or avx2).
// The inner loops are plain `omp simd` loops over one row, which the compiler vectorises for
// the target ISA; a row (a few KB) stays in L1 between the passes, so x is read from memory
// once and the output written once.
#include <cstdint>
#include <type_traits>

#include <omp.h>

#include "../common/math.h"
#include "../common/status.h"
#include "dtype.h"
#include "kernels.h"
#include "memory.h"
#include "row.h"

#ifndef ONESTEP_ISA
#error "ONESTEP_ISA must name the instruction-set namespace"
#endif

namespace onestep::cpu::ONESTEP_ISA {
namespace {

// Rows of one sample reduced together in the per-sample backward. Fixed (not derived from
// the thread count) so that the weight-gradient sums are bit-identical on any machine.
constexpr int64_t kRowsPerChunk = 32;

// `stage` is null, or (fp32 only) a row of scratch: the output is computed there and then
// streamed to `out`.
template <typename T>
void fwd_row(const T* x, const T* shift, const T* scale, T* out, int64_t D, float eps,
             float* buf, float* stage, float* mean_out, float* rstd_out) {
  const float* xf = row_as_float(x, D, buf);
  const float mean = static_cast<float>(blocked_sum(D, [xf](int64_t d) { return xf[d]; }) /
                                        static_cast<double>(D));
  const double m2 = blocked_sum(D, [xf, mean](int64_t d) {
    const float diff = xf[d] - mean;
    return diff * diff;
  });
  const float rstd = layernorm_rstd(static_cast<float>(m2 / static_cast<double>(D)), eps);
  T* dst = out;
  if constexpr (std::is_same_v<T, float>) {
    if (stage != nullptr) dst = stage;
  }
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    dst[d] = from_float<T>(modulate((xf[d] - mean) * rstd, to_float(shift[d]), to_float(scale[d])));
  }
  if constexpr (std::is_same_v<T, float>) {
    if (stage != nullptr) stream_row(out, stage, D);
  }
  if (mean_out != nullptr) {  // statistics are kept for a backward only
    *mean_out = mean;
    *rstd_out = rstd;
  }
}

// One row of the backward. Writes dx; adds dy and dy * xhat into acc_shift / acc_scale
// (per-sample modulation) or stores them into dshift / dscale (per-token modulation).
template <typename T, bool kPerToken>
void bwd_row(const T* dy, const T* x, const T* scale, float mean, float rstd, T* dx, int64_t D,
             float* acc_shift, float* acc_scale, T* dshift, T* dscale) {
  const auto g = [=](int64_t d) { return to_float(dy[d]) * (1.0f + to_float(scale[d])); };
  const auto xhat = [=](int64_t d) { return (to_float(x[d]) - mean) * rstd; };
  const float mean_g = static_cast<float>(blocked_sum(D, g) / static_cast<double>(D));
  const float mean_gx = static_cast<float>(
      blocked_sum(D, [=](int64_t d) { return g(d) * xhat(d); }) / static_cast<double>(D));
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const float dyf = to_float(dy[d]);
    const float g = dyf * (1.0f + to_float(scale[d]));
    const float xhat = (to_float(x[d]) - mean) * rstd;
    dx[d] = from_float<T>(layernorm_dx(g, xhat, mean_g, mean_gx, rstd));
    if constexpr (kPerToken) {
      dshift[d] = from_float<T>(dyf);
      dscale[d] = from_float<T>(dyf * xhat);
    } else {
      acc_shift[d] += dyf;
      acc_scale[d] += dyf * xhat;
    }
  }
}

template <typename T>
int fwd(const LayerNormModulateFwdParams& p, int num_threads) {
  const T* x = static_cast<const T*>(p.x);
  const T* shift = static_cast<const T*>(p.shift);
  const T* scale = static_cast<const T*>(p.scale);
  T* out = static_cast<T*>(p.out);
  float* mean = p.mean;
  float* rstd = p.rstd;
  const int64_t N = p.N, D = p.D, rows = p.B * p.N;
  const int64_t out_bytes = rows * D * static_cast<int64_t>(sizeof(T));
  advise_huge_pages(out, out_bytes);
  const bool streaming = std::is_same_v<T, float> && out_bytes >= kStreamingBytes;
  // Per thread, D floats: the converted input row (16-bit inputs) or the staged output row
  // (streamed fp32 outputs).
  const bool need_buffers = !std::is_same_v<T, float> || streaming;
  const int64_t stride = scratch_stride(D);
  FloatBuffer buffers(need_buffers ? num_threads * stride : 0);
  if (buffers.failed()) return kOutOfMemory;
  parallel_for_threads(num_threads, rows, [&](int64_t r, int thread) {
    float* buf = need_buffers ? buffers.data() + thread * stride : nullptr;
    const int64_t b = r / N, n = r % N;
    fwd_row<T>(x + b * p.x_sb + n * p.x_sn, shift + b * p.shift_sb + n * p.shift_sn,
               scale + b * p.scale_sb + n * p.scale_sn, out + r * D, D, p.eps, buf,
               streaming ? buf : nullptr, mean ? mean + r : nullptr, rstd ? rstd + r : nullptr);
  }, [&] {
    if (streaming) stream_fence();
  });
  return kOk;
}

template <typename T>
int bwd(const LayerNormModulateBwdParams& p, int num_threads) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const T* scale = static_cast<const T*>(p.scale);
  const float* mean = p.mean;
  const float* rstd = p.rstd;
  T* dx = static_cast<T*>(p.dx);
  T* dshift = static_cast<T*>(p.dshift);
  T* dscale = static_cast<T*>(p.dscale);
  const int64_t B = p.B, N = p.N, D = p.D, rows = p.B * p.N;
  const int64_t x_sb = p.x_sb, x_sn = p.x_sn, scale_sb = p.scale_sb, scale_sn = p.scale_sn;
  advise_huge_pages(dx, rows * D * static_cast<int64_t>(sizeof(T)));

  if (p.per_token) {
    advise_huge_pages(dshift, rows * D * static_cast<int64_t>(sizeof(T)));
    advise_huge_pages(dscale, rows * D * static_cast<int64_t>(sizeof(T)));
    parallel_for(num_threads, rows, [&](int64_t r) {
      const int64_t b = r / N, n = r % N;
      bwd_row<T, true>(dy + r * D, x + b * x_sb + n * x_sn, scale + b * scale_sb + n * scale_sn,
                       mean[r], rstd[r], dx + r * D, D, nullptr, nullptr, dshift + r * D,
                       dscale + r * D);
    });
    return kOk;
  }

  // Per-sample: each (sample, chunk of rows) sums into its own fp32 partial, then the
  // partials of a sample are added in chunk order.
  const int64_t chunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  FloatBuffer partial(B * chunks * 2 * D, /*zero=*/true);
  if (partial.failed()) return kOutOfMemory;
  parallel_for(num_threads, B * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, c = task % chunks;
    float* acc_shift = partial.data() + task * 2 * D;
    float* acc_scale = acc_shift + D;
    const int64_t n_end = min_i64(N, (c + 1) * kRowsPerChunk);
    for (int64_t n = c * kRowsPerChunk; n < n_end; ++n) {
      const int64_t r = b * N + n;
      bwd_row<T, false>(dy + r * D, x + b * x_sb + n * x_sn, scale + b * scale_sb, mean[r],
                        rstd[r], dx + r * D, D, acc_shift, acc_scale, nullptr, nullptr);
    }
  });
  reduce_chunk_partials<T, 2>(partial.data(), B, chunks, D, {dshift, dscale}, num_threads);
  return kOk;
}

}  // namespace

int layernorm_modulate_fwd(const LayerNormModulateFwdParams& p, int num_threads) {
  if (p.B < 0 || p.N < 0 || p.D <= 0) return kBadSize;
  if (p.B * p.N == 0) return kOk;
  num_threads = threads_for(num_threads, p.B * p.N * p.D);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return fwd<T>(p, num_threads));
}

int layernorm_modulate_bwd(const LayerNormModulateBwdParams& p, int num_threads) {
  if (p.B < 0 || p.N < 0 || p.D <= 0) return kBadSize;
  num_threads = threads_for(num_threads, p.B * p.N * p.D);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return bwd<T>(p, num_threads));
}

}  // namespace onestep::cpu::ONESTEP_ISA
