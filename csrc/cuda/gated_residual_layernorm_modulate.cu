// r = x + gate * y; out = LayerNorm(r) * (1 + scale) + shift, forward, on the GPU.
// One block per row: the residual is formed and folded into per-thread Welford states, merged
// across the block, then a second pass re-forms it (cheaper than staging it in shared memory
// for every D) and writes both outputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/math.h"
#include "../common/params.h"
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
  if (threadIdx.x == 0 && mean != nullptr) {  // kept for a backward only
    mean[row] = mu;
    rstd[row] = rs;
  }
}

template <typename T>
int fwd(const onestep::GatedResidualFwdParams& p, cudaStream_t stream) {
  grlnmod_fwd_kernel<T><<<static_cast<unsigned>(p.B * p.N), threads_for(p.D), 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.y), static_cast<const T*>(p.gate),
      static_cast<const T*>(p.shift), static_cast<const T*>(p.scale), static_cast<T*>(p.res),
      static_cast<T*>(p.out), p.mean, p.rstd, p.N, p.D, p.gate_sb, p.gate_sn, p.shift_sb,
      p.shift_sn, p.scale_sb, p.scale_sn, p.eps);
  return cudaGetLastError() == cudaSuccess ? onestep::kOk : onestep::kCudaError;
}

}  // namespace

extern "C" int onestep_cuda_gated_residual_layernorm_modulate_fwd(
    const onestep::GatedResidualFwdParams* p, void* stream) {
  if (p->B < 0 || p->N < 0 || p->D <= 0 || p->B * p->N > 0x7fffffffLL) return onestep::kBadSize;
  if (p->B * p->N == 0) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return fwd<T>(*p, static_cast<cudaStream_t>(stream)));
}
