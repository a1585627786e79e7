// y = gelu_tanh(x + bias) on the GPU, forward: one thread per element of the (R, F) input,
// grid-strided. The GELU is csrc/common's (the CPU kernels test it).
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
    bias_gelu_tanh_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                              T* __restrict__ y, int64_t total, int64_t F) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    store(y + i, onestep::gelu_tanh(load(x + i) + load(bias + i % F)));
  }
}

template <typename T>
int fwd(const onestep::BiasGeluTanhFwdParams& p, cudaStream_t stream) {
  const int64_t total = p.R * p.F;
  const int64_t wanted = (total + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(wanted < 65536 ? wanted : 65536);
  bias_gelu_tanh_fwd_kernel<T><<<blocks, 256, 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.bias), static_cast<T*>(p.y), total,
      p.F);
  return cudaGetLastError() == cudaSuccess ? onestep::kOk : onestep::kCudaError;
}

}  // namespace

extern "C" int onestep_cuda_bias_gelu_tanh_fwd(const onestep::BiasGeluTanhFwdParams* p,
                                               void* stream) {
  if (p->R < 0 || p->F <= 0) return onestep::kBadSize;
  if (p->R == 0) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return fwd<T>(*p, static_cast<cudaStream_t>(stream)));
}
