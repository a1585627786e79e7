// LayerNorm (no affine) + adaLN modulation on the GPU, forward and backward, on the row tiles
// of rows.cuh (16-byte vectors, a power-of-two group of threads per row).
//
// Forward: a block holds one row per row group, in registers; each thread's values give a
// Welford state (two passes over its registers), merged across the group by Chan's formula,
// and the output is written from the same registers (one read of x).
// Backward: a block takes kBwdRows rows of one sample. Its threads walk the row's vectors,
// each column thread over its group's rows: the first walk sums g = dy (1 + scale) and g xhat
// per row and writes the modulation's gradients (per-token: their rows; per-sample: the
// block's column sums into a workspace, added up afterwards in a fixed order, so no second
// pass over dy and x is needed for them); the second walk writes dx, re-reading the rows the
// block has just read (from the caches). Per-sample scale is loaded once per vector and block.
// The arithmetic is csrc/common's, which the CPU kernels also run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/math.h"
#include "../common/params.h"
#include "../common/status.h"
#include "block_reduce.cuh"
#include "rows.cuh"

namespace {

using namespace onestep::cuda;
using onestep::Welford;

constexpr int kBwdRows = 16;  // rows per backward block: the per-sample partial sums' grain


template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    lnmod_fwd_kernel(const onestep::LayerNormModulateFwdParams p, const RowTile tile) {
  constexpr int kValues = kRowValues<W>;
  constexpr int kVectors = kValues / W;
  const int columns = tile.columns;
  const int j = threadIdx.x % columns, group = threadIdx.x / columns;
  const int64_t b = blockIdx.y, n = static_cast<int64_t>(blockIdx.x) * tile.groups() + group;
  const bool row_ok = n < p.N;
  const T* x = static_cast<const T*>(p.x) + b * p.x_sb + n * p.x_sn;
  float v[kValues];
  bool valid[kValues];
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * columns + j) * W;
    const bool ok = row_ok && i < tile.vectors && col < p.D;
    float e[W];
    if (ok) {
      load_vector<W>(x + col, e);
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) e[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < W; ++k) {
      v[i * W + k] = e[k];
      valid[i * W + k] = ok;
    }
  }
  const Welford w = group_welford(thread_welford(v, valid), columns);
  const float mu = w.mean;
  const float rs = onestep::layernorm_rstd(w.m2 / static_cast<float>(p.D), p.eps);
  const T* shift = static_cast<const T*>(p.shift) + b * p.shift_sb + n * p.shift_sn;
  const T* scale = static_cast<const T*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  T* out = static_cast<T*>(p.out) + (b * p.N + n) * p.D;
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * columns + j) * W;
    if (!valid[i * W]) continue;
    float sh[W], sc[W], o[W];
    load_vector<W>(shift + col, sh);
    load_vector<W>(scale + col, sc);
#pragma unroll
    for (int k = 0; k < W; ++k) o[k] = onestep::modulate((v[i * W + k] - mu) * rs, sh[k], sc[k]);
    store_vector<W>(out + col, o);
  }
  if (j == 0 && row_ok && p.mean != nullptr) {  // kept for a backward only
    p.mean[b * p.N + n] = mu;
    p.rstd[b * p.N + n] = rs;
  }
}

// RPG: rows per row group, kBwdRows / groups (at least 1: groups past kBwdRows hold none).
// (A minimum of one block per SM declared: without it ptxas 13.0 held some instantiations to
// 80 registers and spilled.)
template <typename T, int W, int RPG>
__global__ void __launch_bounds__(kThreads, 1)
    lnmod_bwd_kernel(const onestep::LayerNormModulateBwdParams p, const RowTile tile) {
  const int columns = tile.columns, j = threadIdx.x % columns;
  const int64_t b = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
  const bool per_token = p.per_token != 0;
  const BlockRows<kBwdRows, RPG> rows(p.mean, p.rstd, b, chunk, p.N, tile);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x) + b * p.x_sb;
  const T* scale = static_cast<const T*>(p.scale) + b * p.scale_sb;
  T* dshift = static_cast<T*>(p.dshift);
  T* dscale = static_cast<T*>(p.dscale);
  float* partial_shift = p.partials + ((0 * gridDim.y + b) * chunks + chunk) * p.D;
  float* partial_scale = p.partials + ((1 * gridDim.y + b) * chunks + chunk) * p.D;
  float sum_g[RPG], sum_gx[RPG];
#pragma unroll
  for (int r = 0; r < RPG; ++r) sum_g[r] = sum_gx[r] = 0.0f;
  for (int i = 0; i < tile.vectors; ++i) {  // first walk: row sums, modulation gradients
    const int64_t col = (static_cast<int64_t>(i) * columns + j) * W;
    const bool col_ok = col < p.D;
    float sc[W], acc_shift[W], acc_scale[W];
#pragma unroll
    for (int k = 0; k < W; ++k) acc_shift[k] = acc_scale[k] = sc[k] = 0.0f;
    if (!per_token && col_ok) load_vector<W>(scale + col, sc);
#pragma unroll
    for (int r = 0; r < RPG; ++r) {
      if (!(rows.ok[r] && col_ok)) continue;
      const int64_t row = rows.row(r) * p.D + col, n = rows.token(r);
      const float mean = rows.mean[rows.local(r)], rstd = rows.rstd[rows.local(r)];
      float g[W], xv[W], gx[W];
      load_vector<W>(dy + row, g);
      load_vector<W>(x + n * p.x_sn + col, xv);
      if (per_token) load_vector<W>(scale + n * p.scale_sn + col, sc);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float xhat = (xv[k] - mean) * rstd;
        gx[k] = g[k] * xhat;
        acc_shift[k] += g[k];
        acc_scale[k] += gx[k];
        const float gk = g[k] * (1.0f + sc[k]);
        sum_g[r] += gk;
        sum_gx[r] += gk * xhat;
      }
      if (per_token) {
        store_vector<W>(dshift + row, g);
        store_vector<W>(dscale + row, gx);
      }
    }
    if (!per_token) {
      sum_over_groups<W>(acc_shift, columns, col_ok, partial_shift + col);
      sum_over_groups<W>(acc_scale, columns, col_ok, partial_scale + col);
    }
  }
  rows.finish_sums(sum_g, sum_gx, columns, p.D);
  T* dx = static_cast<T*>(p.dx);
  for (int i = 0; i < tile.vectors; ++i) {  // second walk: dx
    const int64_t col = (static_cast<int64_t>(i) * columns + j) * W;
    if (col >= p.D) continue;
    float sc[W];
    if (!per_token) load_vector<W>(scale + col, sc);
#pragma unroll
    for (int r = 0; r < RPG; ++r) {
      if (!rows.ok[r]) continue;
      const int64_t row = rows.row(r) * p.D + col, n = rows.token(r);
      const int local = rows.local(r);
      float g[W], xv[W], out[W];
      load_vector<W>(dy + row, g);
      load_vector<W>(x + n * p.x_sn + col, xv);
      if (per_token) load_vector<W>(scale + n * p.scale_sn + col, sc);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float xhat = (xv[k] - rows.mean[local]) * rows.rstd[local];
        out[k] = onestep::layernorm_dx(g[k] * (1.0f + sc[k]), xhat, rows.mean_g[local],
                                       rows.mean_gx[local], rows.rstd[local]);
      }
      store_vector<W>(dx + row, out);
    }
  }
}

template <typename T>
int fwd(const onestep::LayerNormModulateFwdParams& p, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const RowTile tile = RowTile::held(
      p.D, V, vectors_fit(V, {p.x, p.shift, p.scale, p.out},
                          {p.D, p.x_sb, p.x_sn, p.shift_sb, p.shift_sn, p.scale_sb, p.scale_sn}));
  if (tile.columns == 0) return onestep::kBadSize;
  const dim3 grid(static_cast<unsigned>((p.N + tile.groups() - 1) / tile.groups()),
                  static_cast<unsigned>(p.B));
  if (tile.width == V && V != 1) {
    lnmod_fwd_kernel<T, V><<<grid, kThreads, 0, stream>>>(p, tile);
  } else {
    lnmod_fwd_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p, tile);
  }
  return launch_status();
}

template <typename T>
int bwd(const onestep::LayerNormModulateBwdParams& p, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const int64_t chunks = (p.N + kBwdRows - 1) / kBwdRows;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(p.B));
  const bool vectors = vectors_fit(V, {p.dy, p.x, p.scale, p.dx, p.dshift, p.dscale},
                                   {p.D, p.x_sb, p.x_sn, p.scale_sb, p.scale_sn});
  // the backward walks the row (nothing of it held): any number of vectors per thread
  const RowTile tile = RowTile::plan(p.D, vectors ? V : 1, 1 << 30);
  if (chunks > 0) {  // (no rows: the per-sample gradients are zeros, added up below)
    const bool launched = vectors ? launch_rows<kBwdRows>(tile, [&](auto rpg) {
      lnmod_bwd_kernel<T, V, decltype(rpg)::value><<<grid, kThreads, 0, stream>>>(p, tile);
    }) : launch_rows<kBwdRows>(tile, [&](auto rpg) {
      lnmod_bwd_kernel<T, 1, decltype(rpg)::value><<<grid, kThreads, 0, stream>>>(p, tile);
    });
    if (!launched) return onestep::kBadSize;
  }
  if (launch_status() != onestep::kOk || p.per_token) return launch_status();
  return add_up_partials<T>(p.partials, 2, p.B, chunks, p.D, p.dshift, p.dscale, nullptr, stream);
}

}  // namespace

extern "C" {

const char* onestep_cuda_status_string(int code) { return onestep::status_string(code); }

const char* onestep_cuda_last_error_string() { return cudaGetErrorString(cudaPeekAtLastError()); }

int onestep_cuda_params_layout(char* buf, int cap) { return onestep::describe_params(buf, cap); }

// The row tile the launchers pick (rows.cuh), for the offline checks (onestep_kernels.aot):
// out = {columns, vectors per thread, elements per vector}.
int onestep_cuda_row_tile(int64_t D, int32_t width, int32_t max_vectors, int32_t* out) {
  const RowTile tile = RowTile::plan(D, width, max_vectors);
  out[0] = tile.columns;
  out[1] = tile.vectors;
  out[2] = tile.width;
  return tile.columns == 0 ? onestep::kBadSize : onestep::kOk;
}

int onestep_cuda_layernorm_modulate_fwd(const onestep::LayerNormModulateFwdParams* p,
                                        void* stream) {
  if (p->B < 0 || p->N < 0 || p->D <= 0 || p->B > 65535 || p->B * p->N > 0x7fffffffLL)
    return onestep::kBadSize;
  if (p->B * p->N == 0) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return fwd<T>(*p, static_cast<cudaStream_t>(stream)));
}

int onestep_cuda_layernorm_modulate_bwd(const onestep::LayerNormModulateBwdParams* p,
                                        void* stream) {
  if (p->B < 0 || p->N < 0 || p->D <= 0 || p->B > 65535 || p->B * p->N > 0x7fffffffLL ||
      (p->per_token == 0 && p->partials == nullptr && p->N > 0))
    return onestep::kBadSize;
  if (p->B == 0 || (p->N == 0 && p->per_token)) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return bwd<T>(*p, static_cast<cudaStream_t>(stream)));
}

}  // extern "C"
