// Noise screening's scoring: each candidate's token features mean-pooled (fp32), scored by a
// class head (the log-softmax at its condition's label) or by the cosine with another pooled
// feature, then each condition's k best (common/math.h's order). Candidates in parallel, then
// conditions in parallel; every sum runs in a fixed order, so results do not depend on the
// thread count. Compiled once per ISA.
#include <cmath>
#include <cstdint>

#include <omp.h>

#include "../common/math.h"
#include "../common/status.h"
#include "dtype.h"
#include "kernels.h"
#include "row.h"

namespace onestep::cpu::ONESTEP_ISA {
namespace {

template <typename T>
void pool(const T* x, int64_t sm, int64_t st, int64_t m, int64_t tokens, int64_t D,
          float* out) {
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  const T* base = x + m * sm;
  for (int64_t t = 0; t < tokens; ++t) {
    const T* row = base + t * st;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += to_float(row[d]);
  }
  const float count = static_cast<float>(tokens);
  for (int64_t d = 0; d < D; ++d) out[d] /= count;
}

float dot(const float* a, const float* b, int64_t D) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

float class_score(const ScoreCandidatesParams& p, const float* pooled, int64_t label) {
  if (label < 0 || label >= p.C) return NAN;
  LogSumExp lse{-INFINITY, 0.0f};
  float picked = 0.0f;
  for (int64_t c = 0; c < p.C; ++c) {
    const float logit = dot(p.weight + c * p.D, pooled, p.D) + p.bias[c];
    lse = lse_push(lse, logit);
    if (c == label) picked = logit;
  }
  return picked - (lse.max + std::log(lse.sum));
}

template <typename T>
int run(const ScoreCandidatesParams& p, int num_threads) {
  const T* features = static_cast<const T*>(p.features);
  const T* other = static_cast<const T*>(p.other);
  const bool head = p.weight != nullptr;
  const int64_t per_thread = head ? p.D : 2 * p.D;
  FloatBuffer scratch(per_thread * (num_threads > 0 ? num_threads : 1));
  if (scratch.failed()) return kOutOfMemory;
  parallel_for_threads(
      num_threads, p.M,
      [&](int64_t m, int thread) {
        float* pooled = scratch.data() + thread * per_thread;
        pool(features, p.f_sm, p.f_st, m, p.T, p.D, pooled);
        if (head) {
          p.scores[m] = class_score(p, pooled, p.target[m / p.n]);
        } else {
          float* pooled_other = pooled + p.D;
          pool(other, p.o_sm, p.o_st, m, p.T_other, p.D, pooled_other);
          p.scores[m] = cosine_score(dot(pooled, pooled_other, p.D), dot(pooled, pooled, p.D),
                                     dot(pooled_other, pooled_other, p.D));
        }
      },
      [] {});
  // Each condition's k best: sweep i takes the best candidate ranked after sweep i-1's pick.
  parallel_for(num_threads, p.M / p.n, [&](int64_t b) {
    const float* scores = p.scores + b * p.n;
    float last_value = INFINITY;
    int64_t last_index = -1;
    for (int64_t i = 0; i < p.k; ++i) {
      float best_value = -INFINITY;
      int64_t best_index = p.n;
      for (int64_t j = 0; j < p.n; ++j) {
        const float v = screening_value(scores[j]);
        if (ranks_before(last_value, last_index, v, j) &&
            (best_index == p.n || ranks_before(v, j, best_value, best_index))) {
          best_value = v;
          best_index = j;
        }
      }
      p.best[b * p.k + i] = best_index;
      last_value = best_value;
      last_index = best_index;
    }
  });
  return kOk;
}

}  // namespace

int score_candidates(const ScoreCandidatesParams& p, int num_threads) {
  if (p.M < 0 || p.T <= 0 || p.D <= 0 || p.n <= 0 || p.M % p.n != 0 || p.k < 1 || p.k > p.n ||
      p.C < 0 || (p.weight == nullptr && (p.other == nullptr || p.T_other <= 0)) ||
      (p.weight != nullptr && (p.C == 0 || p.bias == nullptr || p.target == nullptr)))
    return kBadSize;
  if (p.M == 0) return kOk;
  num_threads = threads_for(num_threads, p.M * p.T * p.D);
  if (num_threads > p.M) num_threads = static_cast<int>(p.M);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return run<T>(p, num_threads));
}

}  // namespace onestep::cpu::ONESTEP_ISA
