// y = gelu_tanh(x + bias) on the GPU, forward: one thread per element of the (R, F) input,
// grid-strided. The GELU is csrc/common's (the CPU kernels test it). Never run here (no GPU).
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
    bias_gelu_tanh_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                              T* __restrict__ y, int64_t total, int64_t F) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    store(y + i, onestep::gelu_tanh(load(x + i) + load(bias + i % F)));
  }
}

template <typename T>
int fwd(const void* x, const void* bias, void* y, int64_t R, int64_t F, cudaStream_t stream) {
  const int64_t total = R * F;
  const int64_t wanted = (total + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(wanted < 65536 ? wanted : 65536);
  bias_gelu_tanh_fwd_kernel<T><<<blocks, 256, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), total, F);
  return cudaGetLastError() == cudaSuccess ? onestep::kOk : onestep::kCudaError;
}

}  // namespace

extern "C" int onestep_cuda_bias_gelu_tanh_fwd(const void* x, const void* bias, void* y,
                                               int64_t R, int64_t F, int dtype, void* stream) {
  if (R < 0 || F <= 0) return onestep::kBadSize;
  if (R == 0) return onestep::kOk;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case onestep::kFloat32: return fwd<float>(x, bias, y, R, F, s);
    case onestep::kFloat16: return fwd<__half>(x, bias, y, R, F, s);
    case onestep::kBFloat16: return fwd<__nv_bfloat16>(x, bias, y, R, F, s);
    default: return onestep::kBadDtype;
  }
}
