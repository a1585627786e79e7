// Noise screening's scoring: each candidate's token features mean-pooled (fp32), scored by a
// class head (the log-softmax at its condition's label) or by the cosine with another pooled
// feature, then each condition's k best (common/math.h's order). Every candidate is pooled
// first; the class head then runs over blocks of 8 candidates, so that each weight row is read
// once per block. Candidates, blocks and conditions in parallel; every sum runs in a fixed
// order, so results do not depend on the thread count. Compiled once per ISA.
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

// Candidates per block of the class head: each weight row is loaded once for this many dot
// products (the head is a matrix product; blocking is what keeps it off memory).
constexpr int64_t kHeadBlock = 8;

// Scores of candidates [m0, m0 + count) (count <= kHeadBlock) from their pooled rows.
void class_scores(const ScoreCandidatesParams& p, const float* pooled, int64_t m0,
                  int64_t count) {
  LogSumExp lse[kHeadBlock];
  float picked[kHeadBlock];
  int64_t label[kHeadBlock];
  const float* rows[kHeadBlock];
  for (int64_t j = 0; j < kHeadBlock; ++j) {
    lse[j] = LogSumExp{-INFINITY, 0.0f};
    picked[j] = 0.0f;
    label[j] = j < count ? p.target[(m0 + j) / p.n] : -1;
    rows[j] = pooled + (m0 + (j < count ? j : 0)) * p.D;  // (padding lanes repeat the first)
  }
  for (int64_t c = 0; c < p.C; ++c) {
    const float* w = p.weight + c * p.D;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
    for (int64_t d = 0; d < p.D; ++d) {
      const float wd = w[d];
      a0 += wd * rows[0][d];
      a1 += wd * rows[1][d];
      a2 += wd * rows[2][d];
      a3 += wd * rows[3][d];
      a4 += wd * rows[4][d];
      a5 += wd * rows[5][d];
      a6 += wd * rows[6][d];
      a7 += wd * rows[7][d];
    }
    const float dots[kHeadBlock] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int64_t j = 0; j < count; ++j) {
      const float logit = dots[j] + p.bias[c];
      lse[j] = lse_push(lse[j], logit);
      if (c == label[j]) picked[j] = logit;
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    p.scores[m0 + j] = (label[j] < 0 || label[j] >= p.C)
                           ? NAN
                           : picked[j] - (lse[j].max + std::log(lse[j].sum));
  }
}

template <typename T>
int run(const ScoreCandidatesParams& p, int num_threads) {
  const T* features = static_cast<const T*>(p.features);
  const T* other = static_cast<const T*>(p.other);
  const bool head = p.weight != nullptr;
  // every candidate pooled first (and `other`, for the cosine), then scored
  FloatBuffer pooled(p.M * p.D * (head ? 1 : 2));
  if (pooled.failed()) return kOutOfMemory;
  parallel_for(num_threads, p.M, [&](int64_t m) {
    pool(features, p.f_sm, p.f_st, m, p.T, p.D, pooled.data() + m * p.D);
    if (!head) pool(other, p.o_sm, p.o_st, m, p.T_other, p.D, pooled.data() + (p.M + m) * p.D);
  });
  if (head) {
    parallel_for(num_threads, (p.M + kHeadBlock - 1) / kHeadBlock, [&](int64_t block) {
      const int64_t m0 = block * kHeadBlock;
      class_scores(p, pooled.data(), m0, min_i64(kHeadBlock, p.M - m0));
    });
  } else {
    parallel_for(num_threads, p.M, [&](int64_t m) {
      const float* a = pooled.data() + m * p.D;
      const float* b = pooled.data() + (p.M + m) * p.D;
      p.scores[m] = cosine_score(dot(a, b, p.D), dot(a, a, p.D), dot(b, b, p.D));
    });
  }
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
  num_threads = threads_for(num_threads, p.M * (p.T + p.C) * p.D);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return run<T>(p, num_threads));
}

}  // namespace onestep::cpu::ONESTEP_ISA
