// Noise screening's scoring on the GPU: a block per candidate pools its token features into
// shared memory (thread j owns columns j, j + blockDim, ...; each token row is read by
// consecutive threads) and scores them: the class head with a warp per class (lanes split the
// width, a shuffle sum, a running log-sum-exp per warp merged in warp order), or the cosine by
// two block sums. Then a warp per condition takes its k best in k sweeps (common/math.h's
// order; each pick the best ranked after the last one, lanes merged by shuffles). Every sum
// runs in a fixed order: the same picks at every launch.
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
using onestep::LogSumExp;

constexpr int kThreads = 256;

template <typename T>
__device__ void pool(const T* __restrict__ x, int64_t sm, int64_t st, int64_t m, int64_t tokens,
                     int64_t D, float* out) {
  const T* base = x + m * sm;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int64_t t = 0; t < tokens; ++t) acc += load(base + t * st + d);
    out[d] = acc / static_cast<float>(tokens);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) score_kernel(onestep::ScoreCandidatesParams p) {
  extern __shared__ float pooled[];  // D floats, or 2 D for the cosine
  __shared__ LogSumExp warp_lse[kMaxWarps];
  __shared__ float picked;
  const int64_t m = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  pool(static_cast<const T*>(p.features), p.f_sm, p.f_st, m, p.T, p.D, pooled);
  if (p.weight == nullptr) {
    float* other = pooled + p.D;
    pool(static_cast<const T*>(p.other), p.o_sm, p.o_st, m, p.T_other, p.D, other);
    __syncthreads();
    float dot = 0.0f, pp = 0.0f, qq = 0.0f;
    for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
      dot += pooled[d] * other[d];
      pp += pooled[d] * pooled[d];
      qq += other[d] * other[d];
    }
    const float2 first = block_sum2(dot, pp);
    const float2 second = block_sum2(qq, 0.0f);
    if (threadIdx.x == 0) p.scores[m] = onestep::cosine_score(first.x, first.y, second.x);
    return;
  }
  const int64_t label = p.target[m / p.n];
  if (threadIdx.x == 0) picked = 0.0f;
  __syncthreads();
  LogSumExp lse{-INFINITY, 0.0f};
  for (int64_t c = warp; c < p.C; c += warps) {
    const float* w = p.weight + c * p.D;
    float acc = 0.0f;
    for (int64_t d = lane; d < p.D; d += 32) acc += w[d] * pooled[d];
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    const float logit = acc + p.bias[c];
    lse = onestep::lse_push(lse, logit);
    if (c == label && lane == 0) picked = logit;
  }
  if (lane == 0) warp_lse[warp] = lse;
  __syncthreads();
  if (threadIdx.x == 0) {
    LogSumExp total = warp_lse[0];
    for (int i = 1; i < warps; ++i) total = onestep::lse_merge(total, warp_lse[i]);
    p.scores[m] = (label < 0 || label >= p.C) ? NAN : picked - (total.max + logf(total.sum));
  }
}

__global__ void top_k_kernel(onestep::ScoreCandidatesParams p) {
  const int64_t b = blockIdx.x;
  const float* scores = p.scores + b * p.n;
  float last_value = INFINITY;
  long long last_index = -1;
  for (int64_t i = 0; i < p.k; ++i) {
    float best_value = -INFINITY;
    long long best_index = p.n;  // none yet
    for (int64_t j = threadIdx.x; j < p.n; j += 32) {
      const float v = onestep::screening_value(scores[j]);
      if (onestep::ranks_before(last_value, last_index, v, j) &&
          (best_index == p.n || onestep::ranks_before(v, j, best_value, best_index))) {
        best_value = v;
        best_index = j;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, best_value, offset);
      const long long j = __shfl_xor_sync(0xffffffffu, best_index, offset);
      if (j != p.n && (best_index == p.n || onestep::ranks_before(v, j, best_value, best_index))) {
        best_value = v;
        best_index = j;
      }
    }
    if (threadIdx.x == 0) p.best[b * p.k + i] = best_index;
    last_value = best_value;
    last_index = best_index;
  }
}

template <typename T>
int run(const onestep::ScoreCandidatesParams& p, cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(p.weight == nullptr ? 2 : 1) * p.D * sizeof(float);
  if (shared > 48 * 1024) {  // above the default, the kernel must opt in
    if (cudaFuncSetAttribute(score_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(shared)) != cudaSuccess)
      return onestep::kCudaError;
  }
  score_kernel<T><<<static_cast<unsigned>(p.M), kThreads, shared, stream>>>(p);
  top_k_kernel<<<static_cast<unsigned>(p.M / p.n), 32, 0, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? onestep::kOk : onestep::kCudaError;
}

}  // namespace

extern "C" int onestep_cuda_score_candidates(const onestep::ScoreCandidatesParams* p,
                                             void* stream) {
  if (p->M < 0 || p->T <= 0 || p->D <= 0 || p->n <= 0 || p->M % p->n != 0 || p->k < 1 ||
      p->k > p->n || p->M > 2147483647 || p->C < 0 ||
      (p->weight == nullptr && (p->other == nullptr || p->T_other <= 0)) ||
      (p->weight != nullptr && (p->C == 0 || p->bias == nullptr || p->target == nullptr)))
    return onestep::kBadSize;
  if (p->M == 0) return onestep::kOk;
  ONESTEP_CUDA_DTYPE_SWITCH(p->dtype, T, return run<T>(*p, static_cast<cudaStream_t>(stream)));
}
