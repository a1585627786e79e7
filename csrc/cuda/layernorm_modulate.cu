// LayerNorm (no affine) + adaLN modulation on the GPU, forward and backward.
// One thread block per row: each thread folds its strided elements into a Welford state, the
// states are merged across the warp (shuffles) and the block (shared memory), and a second
// pass writes the output. The per-sample weight gradients are reduced over N by a second
// kernel with one thread per feature (deterministic: no atomics).
//
// Compiled here for sm_80/sm_90 but never run on this machine (no GPU): the arithmetic is the
// csrc/common code that the CPU kernels test; thread mapping and speed are unverified.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/math.h"
#include "../common/status.h"
#include "block_reduce.cuh"

namespace {

using namespace onestep::cuda;
using onestep::Welford;

template <typename T>
__global__ void __launch_bounds__(256)
    lnmod_fwd_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                     const T* __restrict__ scale, T* __restrict__ out, float* __restrict__ mean,
                     float* __restrict__ rstd, int64_t N, int64_t D, int64_t x_sb, int64_t x_sn,
                     int64_t shift_sb, int64_t shift_sn, int64_t scale_sb, int64_t scale_sn,
                     float eps) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / N, n = row % N;
  const T* xr = x + b * x_sb + n * x_sn;
  const T* shr = shift + b * shift_sb + n * shift_sn;
  const T* scr = scale + b * scale_sb + n * scale_sn;
  T* outr = out + row * D;

  Welford w{0.0f, 0.0f, 0.0f};
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) w = onestep::welford_push(w, load(xr + d));
  w = block_welford(w);
  const float mu = w.mean;
  const float rs = onestep::layernorm_rstd(w.m2 / static_cast<float>(D), eps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    store(outr + d, onestep::modulate((load(xr + d) - mu) * rs, load(shr + d), load(scr + d)));
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    lnmod_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                        const T* __restrict__ scale, const float* __restrict__ mean,
                        const float* __restrict__ rstd, T* __restrict__ dx,
                        T* __restrict__ dshift, T* __restrict__ dscale, int64_t N, int64_t D,
                        int64_t x_sb, int64_t x_sn, int64_t scale_sb, int64_t scale_sn,
                        bool per_token) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / N, n = row % N;
  const T* dyr = dy + row * D;
  const T* xr = x + b * x_sb + n * x_sn;
  const T* scr = scale + b * scale_sb + n * scale_sn;
  const float mu = mean[row], rs = rstd[row];

  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float g = load(dyr + d) * (1.0f + load(scr + d));
    sum_g += g;
    sum_gx += g * (load(xr + d) - mu) * rs;
  }
  const float2 sums = block_sum2(sum_g, sum_gx);
  const float mean_g = sums.x / static_cast<float>(D), mean_gx = sums.y / static_cast<float>(D);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float dyf = load(dyr + d);
    const float g = dyf * (1.0f + load(scr + d));
    const float xhat = (load(xr + d) - mu) * rs;
    store(dx + row * D + d, onestep::layernorm_dx(g, xhat, mean_g, mean_gx, rs));
    if (per_token) {
      store(dshift + row * D + d, dyf);
      store(dscale + row * D + d, dyf * xhat);
    }
  }
}

// Per-sample modulation: dshift[b, d] = sum_n dy[b, n, d], dscale[b, d] = sum_n dy * xhat.
template <typename T>
__global__ void __launch_bounds__(256)
    lnmod_bwd_dmod_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                          const float* __restrict__ mean, const float* __restrict__ rstd,
                          T* __restrict__ dshift, T* __restrict__ dscale, int64_t N, int64_t D,
                          int64_t x_sb, int64_t x_sn) {
  const int64_t b = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  float acc_shift = 0.0f, acc_scale = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row = b * N + n;
    const float dyf = load(dy + row * D + d);
    acc_shift += dyf;
    acc_scale += dyf * (load(x + b * x_sb + n * x_sn + d) - mean[row]) * rstd[row];
  }
  store(dshift + b * D + d, acc_shift);
  store(dscale + b * D + d, acc_scale);
}

int launch_status() {
  return cudaGetLastError() == cudaSuccess ? onestep::kOk : onestep::kCudaError;
}

template <typename T>
int fwd(const void* x, const void* shift, const void* scale, void* out, float* mean, float* rstd,
        int64_t B, int64_t N, int64_t D, int64_t x_sb, int64_t x_sn, int64_t shift_sb,
        int64_t shift_sn, int64_t scale_sb, int64_t scale_sn, float eps, cudaStream_t stream) {
  lnmod_fwd_kernel<T><<<static_cast<unsigned>(B * N), threads_for(D), 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(shift), static_cast<const T*>(scale),
      static_cast<T*>(out), mean, rstd, N, D, x_sb, x_sn, shift_sb, shift_sn, scale_sb, scale_sn,
      eps);
  return launch_status();
}

template <typename T>
int bwd(const void* dy, const void* x, const void* scale, const float* mean, const float* rstd,
        void* dx, void* dshift, void* dscale, int64_t B, int64_t N, int64_t D, int64_t x_sb,
        int64_t x_sn, int64_t scale_sb, int64_t scale_sn, bool per_token, cudaStream_t stream) {
  if (B * N > 0) {
    lnmod_bwd_dx_kernel<T><<<static_cast<unsigned>(B * N), threads_for(D), 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(scale), mean,
        rstd, static_cast<T*>(dx), static_cast<T*>(dshift), static_cast<T*>(dscale), N, D, x_sb,
        x_sn, scale_sb, scale_sn, per_token);
    if (launch_status() != onestep::kOk) return onestep::kCudaError;
  }
  if (!per_token && B > 0) {
    const dim3 grid(static_cast<unsigned>((D + 255) / 256), static_cast<unsigned>(B));
    lnmod_bwd_dmod_kernel<T><<<grid, 256, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, static_cast<T*>(dshift),
        static_cast<T*>(dscale), N, D, x_sb, x_sn);
  }
  return launch_status();
}

}  // namespace

extern "C" {

const char* onestep_cuda_status_string(int code) { return onestep::status_string(code); }

const char* onestep_cuda_last_error_string() { return cudaGetErrorString(cudaPeekAtLastError()); }

int onestep_cuda_layernorm_modulate_fwd(const void* x, const void* shift, const void* scale,
                                        void* out, float* mean, float* rstd, int64_t B, int64_t N,
                                        int64_t D, int64_t x_sb, int64_t x_sn, int64_t shift_sb,
                                        int64_t shift_sn, int64_t scale_sb, int64_t scale_sn,
                                        int dtype, float eps, void* stream) {
  if (B < 0 || N < 0 || D <= 0 || B * N > 0x7fffffffLL) return onestep::kBadSize;
  if (B * N == 0) return onestep::kOk;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case onestep::kFloat32:
      return fwd<float>(x, shift, scale, out, mean, rstd, B, N, D, x_sb, x_sn, shift_sb,
                        shift_sn, scale_sb, scale_sn, eps, s);
    case onestep::kFloat16:
      return fwd<__half>(x, shift, scale, out, mean, rstd, B, N, D, x_sb, x_sn, shift_sb,
                         shift_sn, scale_sb, scale_sn, eps, s);
    case onestep::kBFloat16:
      return fwd<__nv_bfloat16>(x, shift, scale, out, mean, rstd, B, N, D, x_sb, x_sn, shift_sb,
                                shift_sn, scale_sb, scale_sn, eps, s);
    default:
      return onestep::kBadDtype;
  }
}

int onestep_cuda_layernorm_modulate_bwd(const void* dy, const void* x, const void* scale,
                                        const float* mean, const float* rstd, void* dx,
                                        void* dshift, void* dscale, int64_t B, int64_t N,
                                        int64_t D, int64_t x_sb, int64_t x_sn, int64_t scale_sb,
                                        int64_t scale_sn, int per_token, int dtype,
                                        void* stream) {
  if (B < 0 || N < 0 || D <= 0 || B * N > 0x7fffffffLL) return onestep::kBadSize;
  if (per_token == 0 && B > 65535) return onestep::kBadSize;  // gridDim.y of the reduction
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case onestep::kFloat32:
      return bwd<float>(dy, x, scale, mean, rstd, dx, dshift, dscale, B, N, D, x_sb, x_sn,
                        scale_sb, scale_sn, per_token != 0, s);
    case onestep::kFloat16:
      return bwd<__half>(dy, x, scale, mean, rstd, dx, dshift, dscale, B, N, D, x_sb, x_sn,
                         scale_sb, scale_sn, per_token != 0, s);
    case onestep::kBFloat16:
      return bwd<__nv_bfloat16>(dy, x, scale, mean, rstd, dx, dshift, dscale, B, N, D, x_sb,
                                x_sn, scale_sb, scale_sn, per_token != 0, s);
    default:
      return onestep::kBadDtype;
  }
}

}  // extern "C"
