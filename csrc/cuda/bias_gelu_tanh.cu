// y = gelu_tanh(x + bias) on the GPU, forward and backward, x an (R, F) matrix. A block takes
// kRows rows and a band of `columns` 16-byte vectors of them (rows.cuh's tile: the band width
// chosen so that few lanes idle at MLP widths); each thread keeps its vector of bias in
// registers and walks its row group's rows, so no element computes its column (no division
// or modulo per element). The backward keeps the column sums of dx in registers and writes
// the block's into a workspace, added up afterwards in a fixed order (deterministic dbias).
// The GELU is csrc/common's (the CPU kernels test it).
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

constexpr int kRows = 32;  // rows per block: the dbias partial sums' grain

template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_tanh_fwd_kernel(const onestep::BiasGeluTanhFwdParams p, const RowTile tile) {
  const int columns = tile.columns, groups = tile.groups();
  const int j = threadIdx.x % columns, group = threadIdx.x / columns;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * columns + j) * W;
  if (col >= p.F) return;  // (no block-wide step follows)
  float bias[W];
  load_vector<W>(static_cast<const T*>(p.bias) + col, bias);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t last = first + kRows < p.R ? first + kRows : p.R;
  for (int64_t r = first + group; r < last; r += groups) {
    float u[W];
    load_vector<W>(static_cast<const T*>(p.x) + r * p.F + col, u);
#pragma unroll
    for (int k = 0; k < W; ++k) u[k] = onestep::gelu_tanh(u[k] + bias[k]);
    store_vector<W>(static_cast<T*>(p.y) + r * p.F + col, u);
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_tanh_bwd_kernel(const onestep::BiasGeluTanhBwdParams p, const RowTile tile) {
  const int columns = tile.columns, groups = tile.groups();
  const int j = threadIdx.x % columns, group = threadIdx.x / columns;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * columns + j) * W;
  const bool col_ok = col < p.F;
  float bias[W], acc[W];
#pragma unroll
  for (int k = 0; k < W; ++k) bias[k] = acc[k] = 0.0f;
  if (col_ok) load_vector<W>(static_cast<const T*>(p.bias) + col, bias);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t last = first + kRows < p.R ? first + kRows : p.R;
  for (int64_t r = first + group; col_ok && r < last; r += groups) {
    float u[W], g[W];
    load_vector<W>(static_cast<const T*>(p.x) + r * p.F + col, u);
    load_vector<W>(static_cast<const T*>(p.dy) + r * p.F + col, g);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float v = u[k] + bias[k];
      g[k] *= onestep::gelu_tanh_grad(v, onestep::gelu_tanh_gate(v));
      acc[k] += g[k];
    }
    store_vector<W>(static_cast<T*>(p.dx) + r * p.F + col, g);
  }
  sum_over_groups<W>(acc, columns, col_ok, p.partials + blockIdx.x * p.F + col);
}

// The band of columns per block: every row's vectors split into bands of `columns` threads,
// as many bands (tile.vectors) as the row needs.
template <typename T, typename Params>
RowTile band(const Params& p, std::initializer_list<const void*> pointers) {
  constexpr int V = kVector<T>;
  return RowTile::plan(p.F, vectors_fit(V, pointers, {p.F}) ? V : 1, 1 << 30);
}

template <typename T>
int fwd(const onestep::BiasGeluTanhFwdParams& p, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const RowTile tile = band<T>(p, {p.x, p.bias, p.y});
  const dim3 grid(static_cast<unsigned>((p.R + kRows - 1) / kRows),
                  static_cast<unsigned>(tile.vectors));
  if (tile.width == V && V != 1) {
    bias_gelu_tanh_fwd_kernel<T, V><<<grid, kThreads, 0, stream>>>(p, tile);
  } else {
    bias_gelu_tanh_fwd_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p, tile);
  }
  return launch_status();
}

template <typename T>
int bwd(const onestep::BiasGeluTanhBwdParams& p, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const RowTile tile = band<T>(p, {p.dy, p.x, p.bias, p.dx});
  const int64_t chunks = (p.R + kRows - 1) / kRows;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(tile.vectors));
  if (chunks > 0) {  // (no rows: dbias is zeros, added up below)
    if (tile.width == V && V != 1) {
      bias_gelu_tanh_bwd_kernel<T, V><<<grid, kThreads, 0, stream>>>(p, tile);
    } else {
      bias_gelu_tanh_bwd_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p, tile);
    }
    if (launch_status() != onestep::kOk) return onestep::kCudaError;
  }
  return add_up_partials<T>(p.partials, 1, 1, chunks, p.F, p.dbias, nullptr, nullptr, stream);
}

}  // namespace

extern "C" int onestep_cuda_bias_gelu_tanh_fwd(const onestep::BiasGeluTanhFwdParams* p,
                                               void* stream) {
  if (p->R < 0 || p->F <= 0 || p->F > 65535LL * kMinColumns ||
      (p->R + kRows - 1) / kRows > 0x7fffffffLL)
    return onestep::kBadSize;
  if (p->R == 0) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return fwd<T>(*p, static_cast<cudaStream_t>(stream)));
}

extern "C" int onestep_cuda_bias_gelu_tanh_bwd(const onestep::BiasGeluTanhBwdParams* p,
                                               void* stream) {
  if (p->R < 0 || p->F <= 0 || p->partials == nullptr || p->F > 65535LL * kMinColumns ||
      (p->R + kRows - 1) / kRows > 0x7fffffffLL)
    return onestep::kBadSize;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return bwd<T>(*p, static_cast<cudaStream_t>(stream)));
}
