// LayerNorm (no affine) + adaLN modulation on the GPU, forward and backward.
// One thread block per row: each thread folds its strided elements into a Welford state, the
// states are merged across the warp (shuffles) and the block (shared memory), and a second
// pass writes the output. The per-sample weight gradients are reduced over N by a second
// kernel with one thread per feature (deterministic: no atomics).
// The arithmetic is the csrc/common code that the CPU kernels also run.
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
  if (threadIdx.x == 0 && mean != nullptr) {  // kept for a backward only
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
int fwd(const onestep::LayerNormModulateFwdParams& p, cudaStream_t stream) {
  lnmod_fwd_kernel<T><<<static_cast<unsigned>(p.B * p.N), threads_for(p.D), 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.shift), static_cast<const T*>(p.scale),
      static_cast<T*>(p.out), p.mean, p.rstd, p.N, p.D, p.x_sb, p.x_sn, p.shift_sb, p.shift_sn,
      p.scale_sb, p.scale_sn, p.eps);
  return launch_status();
}

template <typename T>
int bwd(const onestep::LayerNormModulateBwdParams& p, cudaStream_t stream) {
  const int64_t B = p.B, N = p.N, D = p.D;
  if (B * N > 0) {
    lnmod_bwd_dx_kernel<T><<<static_cast<unsigned>(B * N), threads_for(D), 0, stream>>>(
        static_cast<const T*>(p.dy), static_cast<const T*>(p.x), static_cast<const T*>(p.scale),
        p.mean, p.rstd, static_cast<T*>(p.dx), static_cast<T*>(p.dshift),
        static_cast<T*>(p.dscale), N, D, p.x_sb, p.x_sn, p.scale_sb, p.scale_sn,
        p.per_token != 0);
    if (launch_status() != onestep::kOk) return onestep::kCudaError;
  }
  if (!p.per_token && B > 0) {
    const dim3 grid(static_cast<unsigned>((D + 255) / 256), static_cast<unsigned>(B));
    lnmod_bwd_dmod_kernel<T><<<grid, 256, 0, stream>>>(
        static_cast<const T*>(p.dy), static_cast<const T*>(p.x), p.mean, p.rstd,
        static_cast<T*>(p.dshift), static_cast<T*>(p.dscale), N, D, p.x_sb, p.x_sn);
  }
  return launch_status();
}

}  // namespace

extern "C" {

const char* onestep_cuda_status_string(int code) { return onestep::status_string(code); }

const char* onestep_cuda_last_error_string() { return cudaGetErrorString(cudaPeekAtLastError()); }

int onestep_cuda_params_layout(char* buf, int cap) { return onestep::describe_params(buf, cap); }

int onestep_cuda_layernorm_modulate_fwd(const onestep::LayerNormModulateFwdParams* p,
                                        void* stream) {
  if (p->B < 0 || p->N < 0 || p->D <= 0 || p->B * p->N > 0x7fffffffLL) return onestep::kBadSize;
  if (p->B * p->N == 0) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return fwd<T>(*p, static_cast<cudaStream_t>(stream)));
}

int onestep_cuda_layernorm_modulate_bwd(const onestep::LayerNormModulateBwdParams* p,
                                        void* stream) {
  if (p->B < 0 || p->N < 0 || p->D <= 0 || p->B * p->N > 0x7fffffffLL) return onestep::kBadSize;
  if (p->per_token == 0 && p->B > 65535) return onestep::kBadSize;  // gridDim.y of the reduction
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return bwd<T>(*p, static_cast<cudaStream_t>(stream)));
}

}  // extern "C"
