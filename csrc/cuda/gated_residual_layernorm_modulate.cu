// r = x + gate * y; out = LayerNorm(r) * (1 + scale) + shift on the GPU, forward and backward,
// on the row tiles of rows.cuh (the layout and walks of layernorm_modulate.cu).
// Forward: the residual, formed in fp32 and held in registers, is written once and its
// statistics (per-thread two passes, Chan's merge across the row group) describe that fp32
// residual, not its rounding. Backward: the first walk over a block's kBwdRows rows sums
// g = dout (1 + scale) and g xhat per row and writes the shift and scale gradients; the second
// forms dr = dres + d LayerNorm / dr and writes dx = dr, dy = dr gate and the gate's gradient
// (per-sample: column sums of dr y into the workspace, added up afterwards in a fixed order).
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
    grlnmod_fwd_kernel(const onestep::GatedResidualFwdParams p, const RowTile tile) {
  constexpr int kValues = kRowValues<W>;
  constexpr int kVectors = kValues / W;
  const int columns = tile.columns;
  const int j = threadIdx.x % columns, group = threadIdx.x / columns;
  const int64_t b = blockIdx.y, n = static_cast<int64_t>(blockIdx.x) * tile.groups() + group;
  const bool row_ok = n < p.N;
  const int64_t row = b * p.N + n;
  const T* x = static_cast<const T*>(p.x) + row * p.D;
  const T* y = static_cast<const T*>(p.y) + row * p.D;
  const T* gate = static_cast<const T*>(p.gate) + b * p.gate_sb + n * p.gate_sn;
  T* res = static_cast<T*>(p.res) + row * p.D;
  float v[kValues];
  bool valid[kValues];
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * columns + j) * W;
    const bool ok = row_ok && i < tile.vectors && col < p.D;
    float r[W];
    if (ok) {
      float xv[W], yv[W], gv[W];
      load_vector<W>(x + col, xv);
      load_vector<W>(y + col, yv);
      load_vector<W>(gate + col, gv);
#pragma unroll
      for (int k = 0; k < W; ++k) r[k] = gv[k] * yv[k] + xv[k];
      store_vector<W>(res + col, r);
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) r[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < W; ++k) {
      v[i * W + k] = r[k];
      valid[i * W + k] = ok;
    }
  }
  const Welford w = group_welford(thread_welford(v, valid), columns);
  const float mu = w.mean;
  const float rs = onestep::layernorm_rstd(w.m2 / static_cast<float>(p.D), p.eps);
  const T* shift = static_cast<const T*>(p.shift) + b * p.shift_sb + n * p.shift_sn;
  const T* scale = static_cast<const T*>(p.scale) + b * p.scale_sb + n * p.scale_sn;
  T* out = static_cast<T*>(p.out) + row * p.D;
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
    p.mean[row] = mu;
    p.rstd[row] = rs;
  }
}

// RPG: rows per row group, kBwdRows / groups (at least 1: groups past kBwdRows hold none).
// (A minimum of one block per SM declared: without it ptxas 13.0 held some instantiations to
// 80 registers and spilled.)
template <typename T, int W, int RPG>
__global__ void __launch_bounds__(kThreads, 1)
    grlnmod_bwd_kernel(const onestep::GatedResidualBwdParams p, const RowTile tile) {
  const int columns = tile.columns, j = threadIdx.x % columns;
  const int64_t b = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x, B = gridDim.y;
  const bool per_token = p.per_token != 0;
  const BlockRows<kBwdRows, RPG> rows(p.mean, p.rstd, b, chunk, p.N, tile);
  const T* dres = static_cast<const T*>(p.dres);
  const T* dout = static_cast<const T*>(p.dout);
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const T* gate = static_cast<const T*>(p.gate) + b * p.gate_sb;
  const T* scale = static_cast<const T*>(p.scale) + b * p.scale_sb;
  float* partial_gate = p.partials + ((0 * B + b) * chunks + chunk) * p.D;
  float* partial_shift = p.partials + ((1 * B + b) * chunks + chunk) * p.D;
  float* partial_scale = p.partials + ((2 * B + b) * chunks + chunk) * p.D;
  float sum_g[RPG], sum_gx[RPG];
#pragma unroll
  for (int r = 0; r < RPG; ++r) sum_g[r] = sum_gx[r] = 0.0f;
  for (int i = 0; i < tile.vectors; ++i) {  // first walk: row sums, shift and scale gradients
    const int64_t col = (static_cast<int64_t>(i) * columns + j) * W;
    const bool col_ok = col < p.D;
    float gv[W], sc[W], acc_shift[W], acc_scale[W];
#pragma unroll
    for (int k = 0; k < W; ++k) acc_shift[k] = acc_scale[k] = gv[k] = sc[k] = 0.0f;
    if (!per_token && col_ok) {
      load_vector<W>(gate + col, gv);
      load_vector<W>(scale + col, sc);
    }
#pragma unroll
    for (int r = 0; r < RPG; ++r) {
      if (!(rows.ok[r] && col_ok)) continue;
      const int64_t row = rows.row(r) * p.D + col, n = rows.token(r);
      const float mean = rows.mean[rows.local(r)], rstd = rows.rstd[rows.local(r)];
      float d[W], xv[W], yv[W], dscale[W];
      load_vector<W>(dout + row, d);
      load_vector<W>(x + row, xv);
      load_vector<W>(y + row, yv);
      if (per_token) {
        load_vector<W>(gate + n * p.gate_sn + col, gv);
        load_vector<W>(scale + n * p.scale_sn + col, sc);
      }
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float xhat = (gv[k] * yv[k] + xv[k] - mean) * rstd;
        dscale[k] = d[k] * xhat;
        acc_shift[k] += d[k];
        acc_scale[k] += dscale[k];
        const float gk = d[k] * (1.0f + sc[k]);
        sum_g[r] += gk;
        sum_gx[r] += gk * xhat;
      }
      if (per_token) {
        store_vector<W>(static_cast<T*>(p.dshift) + row, d);
        store_vector<W>(static_cast<T*>(p.dscale) + row, dscale);
      }
    }
    if (!per_token) {
      sum_over_groups<W>(acc_shift, columns, col_ok, partial_shift + col);
      sum_over_groups<W>(acc_scale, columns, col_ok, partial_scale + col);
    }
  }
  rows.finish_sums(sum_g, sum_gx, columns, p.D);
  for (int i = 0; i < tile.vectors; ++i) {  // second walk: dx, dy, the gate's gradient
    const int64_t col = (static_cast<int64_t>(i) * columns + j) * W;
    const bool col_ok = col < p.D;
    float gv[W], sc[W], acc_gate[W];
#pragma unroll
    for (int k = 0; k < W; ++k) acc_gate[k] = gv[k] = sc[k] = 0.0f;
    if (!per_token && col_ok) {
      load_vector<W>(gate + col, gv);
      load_vector<W>(scale + col, sc);
    }
#pragma unroll
    for (int r = 0; r < RPG; ++r) {
      if (!(rows.ok[r] && col_ok)) continue;
      const int64_t row = rows.row(r) * p.D + col, n = rows.token(r);
      const int local = rows.local(r);
      float dr[W], d[W], xv[W], yv[W], dyv[W], dg[W];
      load_vector<W>(dres + row, dr);
      load_vector<W>(dout + row, d);
      load_vector<W>(x + row, xv);
      load_vector<W>(y + row, yv);
      if (per_token) {
        load_vector<W>(gate + n * p.gate_sn + col, gv);
        load_vector<W>(scale + n * p.scale_sn + col, sc);
      }
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float xhat = (gv[k] * yv[k] + xv[k] - rows.mean[local]) * rows.rstd[local];
        dr[k] += onestep::layernorm_dx(d[k] * (1.0f + sc[k]), xhat, rows.mean_g[local],
                                       rows.mean_gx[local], rows.rstd[local]);
        dyv[k] = dr[k] * gv[k];
        dg[k] = dr[k] * yv[k];
        acc_gate[k] += dg[k];
      }
      store_vector<W>(static_cast<T*>(p.dx) + row, dr);
      store_vector<W>(static_cast<T*>(p.dy) + row, dyv);
      if (per_token) store_vector<W>(static_cast<T*>(p.dgate) + row, dg);
    }
    if (!per_token) sum_over_groups<W>(acc_gate, columns, col_ok, partial_gate + col);
  }
}

template <typename T>
int fwd(const onestep::GatedResidualFwdParams& p, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const RowTile tile = RowTile::held(
      p.D, V, vectors_fit(V, {p.x, p.y, p.gate, p.shift, p.scale, p.res, p.out},
                          {p.D, p.gate_sb, p.gate_sn, p.shift_sb, p.shift_sn, p.scale_sb,
                           p.scale_sn}));
  if (tile.columns == 0) return onestep::kBadSize;
  const dim3 grid(static_cast<unsigned>((p.N + tile.groups() - 1) / tile.groups()),
                  static_cast<unsigned>(p.B));
  if (tile.width == V && V != 1) {
    grlnmod_fwd_kernel<T, V><<<grid, kThreads, 0, stream>>>(p, tile);
  } else {
    grlnmod_fwd_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p, tile);
  }
  return launch_status();
}

template <typename T>
int bwd(const onestep::GatedResidualBwdParams& p, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const int64_t chunks = (p.N + kBwdRows - 1) / kBwdRows;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(p.B));
  const bool vectors = vectors_fit(
      V, {p.dres, p.dout, p.x, p.y, p.gate, p.scale, p.dx, p.dy, p.dgate, p.dshift, p.dscale},
      {p.D, p.gate_sb, p.gate_sn, p.scale_sb, p.scale_sn});
  const RowTile tile = RowTile::plan(p.D, vectors ? V : 1, 1 << 30);
  if (chunks > 0) {  // (no rows: the per-sample gradients are zeros, added up below)
    const bool launched = vectors ? launch_rows<kBwdRows>(tile, [&](auto rpg) {
      grlnmod_bwd_kernel<T, V, decltype(rpg)::value><<<grid, kThreads, 0, stream>>>(p, tile);
    }) : launch_rows<kBwdRows>(tile, [&](auto rpg) {
      grlnmod_bwd_kernel<T, 1, decltype(rpg)::value><<<grid, kThreads, 0, stream>>>(p, tile);
    });
    if (!launched) return onestep::kBadSize;
  }
  if (launch_status() != onestep::kOk || p.per_token) return launch_status();
  return add_up_partials<T>(p.partials, 3, p.B, chunks, p.D, p.dgate, p.dshift, p.dscale,
                            stream);
}

}  // namespace

extern "C" int onestep_cuda_gated_residual_layernorm_modulate_fwd(
    const onestep::GatedResidualFwdParams* p, void* stream) {
  if (p->B < 0 || p->N < 0 || p->D <= 0 || p->B > 65535 || p->B * p->N > 0x7fffffffLL)
    return onestep::kBadSize;
  if (p->B * p->N == 0) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return fwd<T>(*p, static_cast<cudaStream_t>(stream)));
}

extern "C" int onestep_cuda_gated_residual_layernorm_modulate_bwd(
    const onestep::GatedResidualBwdParams* p, void* stream) {
  if (p->B < 0 || p->N < 0 || p->D <= 0 || p->B > 65535 || p->B * p->N > 0x7fffffffLL ||
      (p->per_token == 0 && p->partials == nullptr && p->N > 0))
    return onestep::kBadSize;
  if (p->B == 0 || (p->N == 0 && p->per_token)) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return bwd<T>(*p, static_cast<cudaStream_t>(stream)));
}
