// Device helpers shared by the CUDA kernels: dtype loads/stores through float, block-wide
// sums. Header-only (each .cu is compiled whole, without -rdc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/math.h"
#include "../common/params.h"

// The dtype switch of the CUDA launchers (common/params.h), with CUDA's 16-bit types.
#define ONESTEP_CUDA_DTYPE_SWITCH(code, T, ...) \
  ONESTEP_DTYPE_SWITCH(code, T, __half, __nv_bfloat16, __VA_ARGS__)

namespace onestep::cuda {

using onestep::Welford;


__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

constexpr int kMaxWarps = 32;

// Block-wide sum of two floats; every thread gets the result.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 warp_sums[kMaxWarps];
  __shared__ float2 result;
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = make_float2(a, b);
  __syncthreads();
  if (threadIdx.x == 0) {
    float2 total = warp_sums[0];
    for (int i = 1; i < static_cast<int>(blockDim.x / 32); ++i) {
      total.x += warp_sums[i].x;
      total.y += warp_sums[i].y;
    }
    result = total;
  }
  __syncthreads();
  return result;
}

}  // namespace onestep::cuda
