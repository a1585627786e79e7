// Gated residual then LayerNorm + adaLN modulation in one pass over each row:
//   r = x + gate * y;   out = LayerNorm(r) * (1 + scale) + shift
// The two halves of a DiT block meet here (the attention branch's gated residual and the MLP
// branch's modulated norm). Forward and backward; compiled once per ISA like the other kernels.
#include <cstdint>
#include <type_traits>

#include <omp.h>

#include "../common/math.h"
#include "../common/status.h"
#include "dtype.h"
#include "kernels.h"
#include "memory.h"
#include "row.h"

namespace onestep::cpu::ONESTEP_ISA {
namespace {

constexpr int64_t kRowsPerChunk = 32;  // see layernorm_modulate.cpp: fixed for determinism

// The fp32 residual r = x + gate * y, as the forward computes it. The backward rebuilds it
// from the inputs rather than reading the rounded residual it returned: the statistics
// describe the fp32 one, and at a large row mean (|r| ~ 64 in bf16) rounding r moves x_hat
// by much more than the gradients' own rounding.
template <typename T>
inline float residual(const T* x, const T* y, const T* gate, int64_t d) {
  return to_float(gate[d]) * to_float(y[d]) + to_float(x[d]);
}

template <typename T>
void fwd_row(const T* x, const T* y, const T* gate, const T* shift, const T* scale, T* res,
             T* out, int64_t D, float eps, float* r, float* mean_out, float* rstd_out) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) r[d] = residual(x, y, gate, d);
  const float mean = static_cast<float>(blocked_sum(D, [r](int64_t d) { return r[d]; }) /
                                        static_cast<double>(D));
  const double m2 = blocked_sum(D, [r, mean](int64_t d) {
    const float diff = r[d] - mean;
    return diff * diff;
  });
  const float rstd = layernorm_rstd(static_cast<float>(m2 / static_cast<double>(D)), eps);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    res[d] = from_float<T>(r[d]);
    out[d] = from_float<T>(modulate((r[d] - mean) * rstd, to_float(shift[d]), to_float(scale[d])));
  }
  if (mean_out != nullptr) {  // statistics are kept for a backward only
    *mean_out = mean;
    *rstd_out = rstd;
  }
}

// One row of the backward. dres is the gradient flowing into the residual output directly;
// the LayerNorm's gradient is added to it. Per-sample modulation gradients go to the acc_*
// rows, per-token ones straight to dgate/dshift/dscale.
template <typename T, bool kPerToken>
void bwd_row(const T* dres, const T* dout, const T* x, const T* y, const T* gate,
             const T* scale, float mean, float rstd, T* dx, T* dy, int64_t D, float* acc_gate,
             float* acc_shift, float* acc_scale, T* dgate, T* dshift, T* dscale) {
  const auto g = [=](int64_t d) { return to_float(dout[d]) * (1.0f + to_float(scale[d])); };
  const float mean_g = static_cast<float>(blocked_sum(D, g) / static_cast<double>(D));
  const float mean_gx = static_cast<float>(
      blocked_sum(D, [=](int64_t d) { return g(d) * (residual(x, y, gate, d) - mean) * rstd; }) /
      static_cast<double>(D));
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const float doutf = to_float(dout[d]);
    const float xhat = (residual(x, y, gate, d) - mean) * rstd;
    const float g = doutf * (1.0f + to_float(scale[d]));
    const float dr = to_float(dres[d]) + layernorm_dx(g, xhat, mean_g, mean_gx, rstd);
    dx[d] = from_float<T>(dr);
    dy[d] = from_float<T>(dr * to_float(gate[d]));
    const float yf = to_float(y[d]);
    if constexpr (kPerToken) {
      dgate[d] = from_float<T>(dr * yf);
      dshift[d] = from_float<T>(doutf);
      dscale[d] = from_float<T>(doutf * xhat);
    } else {
      acc_gate[d] += dr * yf;
      acc_shift[d] += doutf;
      acc_scale[d] += doutf * xhat;
    }
  }
}

template <typename T>
int fwd(const GatedResidualFwdParams& p, int num_threads) {
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const T* gate = static_cast<const T*>(p.gate);
  const T* shift = static_cast<const T*>(p.shift);
  const T* scale = static_cast<const T*>(p.scale);
  T* res = static_cast<T*>(p.res);
  T* out = static_cast<T*>(p.out);
  float* mean = p.mean;
  float* rstd = p.rstd;
  const int64_t N = p.N, D = p.D, rows = p.B * p.N;
  advise_huge_pages(res, rows * D * static_cast<int64_t>(sizeof(T)));
  advise_huge_pages(out, rows * D * static_cast<int64_t>(sizeof(T)));
  const int64_t stride = scratch_stride(D);
  FloatBuffer buffers(num_threads * stride);  // each thread's fp32 residual row
  if (buffers.failed()) return kOutOfMemory;
  parallel_for_threads(num_threads, rows, [&](int64_t row, int thread) {
    const int64_t b = row / N, n = row % N;
    fwd_row<T>(x + row * D, y + row * D, gate + b * p.gate_sb + n * p.gate_sn,
               shift + b * p.shift_sb + n * p.shift_sn, scale + b * p.scale_sb + n * p.scale_sn,
               res + row * D, out + row * D, D, p.eps, buffers.data() + thread * stride,
               mean ? mean + row : nullptr, rstd ? rstd + row : nullptr);
  }, [] {});
  return kOk;
}

template <typename T>
int bwd(const GatedResidualBwdParams& p, int num_threads) {
  const T* dres = static_cast<const T*>(p.dres);
  const T* dout = static_cast<const T*>(p.dout);
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const T* gate = static_cast<const T*>(p.gate);
  const T* scale = static_cast<const T*>(p.scale);
  const float* mean = p.mean;
  const float* rstd = p.rstd;
  T* dx = static_cast<T*>(p.dx);
  T* dy = static_cast<T*>(p.dy);
  T* dgate = static_cast<T*>(p.dgate);
  T* dshift = static_cast<T*>(p.dshift);
  T* dscale = static_cast<T*>(p.dscale);
  const int64_t B = p.B, N = p.N, D = p.D, rows = p.B * p.N;
  advise_huge_pages(dx, rows * D * static_cast<int64_t>(sizeof(T)));
  advise_huge_pages(dy, rows * D * static_cast<int64_t>(sizeof(T)));
  const int64_t g_sb = p.gate_sb, g_sn = p.gate_sn;
  const int64_t s_sb = p.scale_sb, s_sn = p.scale_sn;

  if (p.per_token) {
    parallel_for(num_threads, rows, [&](int64_t row) {
      const int64_t b = row / N, n = row % N;
      bwd_row<T, true>(dres + row * D, dout + row * D, x + row * D, y + row * D,
                       gate + b * g_sb + n * g_sn, scale + b * s_sb + n * s_sn, mean[row],
                       rstd[row], dx + row * D, dy + row * D, D, nullptr, nullptr, nullptr,
                       dgate + row * D, dshift + row * D, dscale + row * D);
    });
    return kOk;
  }

  const int64_t chunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  FloatBuffer partial(B * chunks * 3 * D, /*zero=*/true);
  if (partial.failed()) return kOutOfMemory;
  parallel_for(num_threads, B * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, c = task % chunks;
    float* acc = partial.data() + task * 3 * D;
    const int64_t n_end = min_i64(N, (c + 1) * kRowsPerChunk);
    for (int64_t n = c * kRowsPerChunk; n < n_end; ++n) {
      const int64_t row = b * N + n;
      bwd_row<T, false>(dres + row * D, dout + row * D, x + row * D, y + row * D,
                        gate + b * g_sb, scale + b * s_sb, mean[row], rstd[row], dx + row * D,
                        dy + row * D, D, acc, acc + D, acc + 2 * D, nullptr, nullptr, nullptr);
    }
  });
  reduce_chunk_partials<T, 3>(partial.data(), B, chunks, D, {dgate, dshift, dscale},
                              num_threads);
  return kOk;
}

}  // namespace

int gated_residual_layernorm_modulate_fwd(const GatedResidualFwdParams& p, int num_threads) {
  if (p.B < 0 || p.N < 0 || p.D <= 0) return kBadSize;
  if (p.B * p.N == 0) return kOk;
  num_threads = threads_for(num_threads, p.B * p.N * p.D);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return fwd<T>(p, num_threads));
}

int gated_residual_layernorm_modulate_bwd(const GatedResidualBwdParams& p, int num_threads) {
  if (p.B < 0 || p.N < 0 || p.D <= 0) return kBadSize;
  num_threads = threads_for(num_threads, p.B * p.N * p.D);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return bwd<T>(p, num_threads));
}

}  // namespace onestep::cpu::ONESTEP_ISA
