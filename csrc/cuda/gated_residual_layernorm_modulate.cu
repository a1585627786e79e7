// r = x + gate * y; out = LayerNorm(r) * (1 + scale) + shift, forward, on the GPU.
// One block per row: the residual is formed and folded into per-thread Welford states, merged
// across the block, then a second pass re-forms it (cheaper than staging it in shared memory
// for every D) and writes both outputs. Compiled for sm_80/sm_90 here, never run (no GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/math.h"
#include "../common/status.h"
#include "block_reduce.cuh"

namespace {

using namespace onestep::cuda;

template <typename T>
__global__ void __launch_bounds__(256)
    grlnmod_fwd_kernel(const T* __restrict__ x, const T* __restrict__ y,
                       const T* __restrict__ gate, const T* __restrict__ shift,
                       const T* __restrict__ scale, T* __restrict__ res, T* __restrict__ out,
                       float* __restrict__ mean, float* __restrict__ rstd, int64_t N, int64_t D,
                       int64_t gate_sb, int64_t gate_sn, int64_t shift_sb, int64_t shift_sn,
                       int64_t scale_sb, int64_t scale_sn, float eps) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / N, n = row % N;
  const T* xr = x + row * D;
  const T* yr = y + row * D;
  const T* gr = gate + b * gate_sb + n * gate_sn;
  onestep::Welford w{0.0f, 0.0f, 0.0f};
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    w = onestep::welford_push(w, fmaf(load(gr + d), load(yr + d), load(xr + d)));
  w = block_welford(w);
  const float mu = w.mean;
  const float rs = onestep::layernorm_rstd(w.m2 / static_cast<float>(D), eps);
  const T* shr = shift + b * shift_sb + n * shift_sn;
  const T* scr = scale + b * scale_sb + n * scale_sn;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float r = fmaf(load(gr + d), load(yr + d), load(xr + d));
    store(res + row * D + d, r);
    store(out + row * D + d, onestep::modulate((r - mu) * rs, load(shr + d), load(scr + d)));
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

template <typename T>
int fwd(const void* x, const void* y, const void* gate, const void* shift, const void* scale,
        void* res, void* out, float* mean, float* rstd, int64_t B, int64_t N, int64_t D,
        const int64_t* s, float eps, cudaStream_t stream) {
  grlnmod_fwd_kernel<T><<<static_cast<unsigned>(B * N), threads_for(D), 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const T*>(gate),
      static_cast<const T*>(shift), static_cast<const T*>(scale), static_cast<T*>(res),
      static_cast<T*>(out), mean, rstd, N, D, s[0], s[1], s[2], s[3], s[4], s[5], eps);
  return cudaGetLastError() == cudaSuccess ? onestep::kOk : onestep::kCudaError;
}

}  // namespace

extern "C" int onestep_cuda_gated_residual_layernorm_modulate_fwd(
    const void* x, const void* y, const void* gate, const void* shift, const void* scale,
    void* res, void* out, float* mean, float* rstd, int64_t B, int64_t N, int64_t D,
    const int64_t* mod_strides, int dtype, float eps, void* stream) {
  if (B < 0 || N < 0 || D <= 0 || B * N > 0x7fffffffLL) return onestep::kBadSize;
  if (B * N == 0) return onestep::kOk;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case onestep::kFloat32:
      return fwd<float>(x, y, gate, shift, scale, res, out, mean, rstd, B, N, D, mod_strides, eps, s);
    case onestep::kFloat16:
      return fwd<__half>(x, y, gate, shift, scale, res, out, mean, rstd, B, N, D, mod_strides, eps, s);
    case onestep::kBFloat16:
      return fwd<__nv_bfloat16>(x, y, gate, shift, scale, res, out, mean, rstd, B, N, D,
                                mod_strides, eps, s);
    default:
      return onestep::kBadDtype;
  }
}
