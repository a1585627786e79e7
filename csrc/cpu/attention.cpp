// Non-causal softmax attention on the CPU, forward and backward, computed as small blocked
// matrix products on packed fp32 panels (the way a BLAS micro-kernel works, so that the
// products run at close to the FMA units' rate; a loop over the formula would not).
//
// q, out, dout are (B, H, N, D), k and v (B, H, Nk, D), each with its own (B, H, N) strides and
// a contiguous last dimension (so q, k, v can be views of one QKV projection, and out can be
// laid out as (B, N, H, D), which the projection after attention reads without a copy);
// dq, dk, dv are contiguous. lse is the base-2 log-sum-exp of each query's scaled scores,
// (B, H, N) fp32, as the Triton kernels keep it.
//
// Forward: one task is a (batch, head) and a range of its queries. It packs K^T and V once as
// fp32, then for each block of kMR queries computes the whole row of scores S = q K^T * scale
// (kMR x Nk floats: no N x N matrix), its exact softmax, and P V.
// Backward: one task is a (batch, head), walking key chunks of kKeyChunk and, inside, query
// blocks of kQueryBlock: P from the saved lse, dV += P^T dO, dS = P (dO V^T - delta),
// dK += dS^T Q, dQ += dS K. dQ is accumulated by the task over the chunks in order, so the
// result does not depend on the thread count (and no atomics). Compiled once per ISA.
#include <cstdint>
#include <cstring>

#include <omp.h>

#include "../common/math.h"
#include "../common/status.h"
#include "dtype.h"
#include "kernels.h"
#include "row.h"

namespace onestep::cpu::ONESTEP_ISA {
namespace {

// A vector of floats as one value (GCC's vector extension): one AVX register (8 floats) in the
// avx2 build, one SSE register (4 floats) in the portable one. A micro-tile is kMR rows by two
// vectors of C held in registers: 12 of the 16 registers, plus two for B and one for A.
#if defined(__AVX2__)
constexpr int kVec = 8;
#else
constexpr int kVec = 4;
#endif
typedef float vec __attribute__((vector_size(kVec * sizeof(float))));

inline vec load_vec(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

inline void store_vec(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

constexpr int kMR = 6;
constexpr int kNR = 2 * kVec;
constexpr int64_t kQueryBlock = 64;  // backward: query rows per block (inner size of dK, dV)
constexpr int64_t kKeyChunk = 256;   // backward: keys per chunk (bounds the S and dP panels)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[r][0:kNR] (+)= sum_p A[r * ars + p * aps] * B[p * ldb + 0:kNR], r < MR.
template <int MR, bool kAccumulate>
inline void micro_tile(int64_t P, const float* A, int64_t ars, int64_t aps, const float* B,
                       int64_t ldb, float* C, int64_t ldc) {
  vec c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = kAccumulate ? load_vec(C + r * ldc) : vec{};
    c1[r] = kAccumulate ? load_vec(C + r * ldc + kVec) : vec{};
  }
  for (int64_t p = 0; p < P; ++p) {
    const vec b0 = load_vec(B + p * ldb);
    const vec b1 = load_vec(B + p * ldb + kVec);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * ars + p * aps];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    store_vec(C + r * ldc, c0[r]);
    store_vec(C + r * ldc + kVec, c1[r]);
  }
}

template <int MR, bool kAccumulate>
inline void row_panel(int64_t cols, int64_t P, const float* A, int64_t ars, int64_t aps,
                      const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int64_t j = 0; j < cols; j += kNR)
    micro_tile<MR, kAccumulate>(P, A, ars, aps, B + j, ldb, C + j, ldc);
}

// C (M x cols, row stride ldc) (+)= A (M x P, element (r, p) at A[r * ars + p * aps]) times
// B (P x cols, row stride ldb). cols is a multiple of kNR (panels are padded to it).
template <bool kAccumulate>
void gemm(int64_t M, int64_t cols, int64_t P, const float* A, int64_t ars, int64_t aps,
          const float* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t r = 0;
  for (; r + kMR <= M; r += kMR)
    row_panel<kMR, kAccumulate>(cols, P, A + r * ars, ars, aps, B, ldb, C + r * ldc, ldc);
  const float* At = A + r * ars;
  float* Ct = C + r * ldc;
  switch (M - r) {  // the remaining rows, fewer than kMR
    case 5: row_panel<5, kAccumulate>(cols, P, At, ars, aps, B, ldb, Ct, ldc); break;
    case 4: row_panel<4, kAccumulate>(cols, P, At, ars, aps, B, ldb, Ct, ldc); break;
    case 3: row_panel<3, kAccumulate>(cols, P, At, ars, aps, B, ldb, Ct, ldc); break;
    case 2: row_panel<2, kAccumulate>(cols, P, At, ars, aps, B, ldb, Ct, ldc); break;
    case 1: row_panel<1, kAccumulate>(cols, P, At, ars, aps, B, ldb, Ct, ldc); break;
    default: break;
  }
}

// ---- packing: strided rows of T into fp32 panels, zero-padded ------------------------------

// dst[i * ld + d] = src row i (times mul) for i < rows, d < D; zeros for d in [D, ld).
template <typename T>
void pack_rows(const T* src, int64_t row_stride, int64_t rows, int64_t D, float mul, float* dst,
               int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * row_stride;
    float* o = dst + i * ld;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = to_float(s[d]) * mul;
    for (int64_t d = D; d < ld; ++d) o[d] = 0.0f;
  }
}

// dst[d * ld + i] = src row i, element d (a transposed panel, keys along the vector), zeros
// for i in [rows, ld). Eight rows at a time, so that each store is a contiguous run of eight.
template <typename T>
void pack_transposed(const T* src, int64_t row_stride, int64_t rows, int64_t D, float* dst,
                     int64_t ld) {
  for (int64_t d = 0; d < D; ++d)
    std::memset(dst + d * ld + rows, 0, (ld - rows) * sizeof(float));
  int64_t i0 = 0;
  for (; i0 + 8 <= rows; i0 += 8) {
    const T* s = src + i0 * row_stride;
    for (int64_t d = 0; d < D; ++d) {
      float* o = dst + d * ld + i0;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) o[i] = to_float(s[i * row_stride + d]);
    }
  }
  for (int64_t i = i0; i < rows; ++i)
    for (int64_t d = 0; d < D; ++d) dst[d * ld + i] = to_float(src[i * row_stride + d]);
}

// e^x for the softmax's x = score - row max <= 0: exp_poly without its upper clamp (x is never
// positive here) and with arguments below -87 taken as -87 (e^-87 ~ 1.6e-38, a zero weight
// next to the row's maximum, whose weight is 1). NaN passes through.
inline float exp_nonpositive(float x) { return exp_in_range(x < -87.0f ? -87.0f : x); }

// Element offset of row n of (b, h) in a (B, H, N, D) tensor with strides s[0..2].
struct RowStrides {
  int64_t b, h, n;
  int64_t row(int64_t bb, int64_t hh, int64_t nn) const { return bb * b + hh * h + nn * n; }
};

// The (B, H, N) strides of q, k, v, out and (backward) dout, from the launcher's params.
struct Strides {
  RowStrides q, k, v, out, dout;
  explicit Strides(const AttentionFwdParams& p)
      : q{p.q_sb, p.q_sh, p.q_sn}, k{p.k_sb, p.k_sh, p.k_sn}, v{p.v_sb, p.v_sh, p.v_sn},
        out{p.out_sb, p.out_sh, p.out_sn}, dout{0, 0, 0} {}
  explicit Strides(const AttentionBwdParams& p)
      : q{p.q_sb, p.q_sh, p.q_sn}, k{p.k_sb, p.k_sh, p.k_sn}, v{p.v_sb, p.v_sh, p.v_sn},
        out{p.out_sb, p.out_sh, p.out_sn}, dout{p.dout_sb, p.dout_sh, p.dout_sn} {}
};

// ---- forward --------------------------------------------------------------------------------

template <typename T>
int fwd(const AttentionFwdParams& p, int num_threads) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  float* lse = p.lse;
  const int64_t B = p.B, H = p.H, N = p.N, NK = p.NK, D = p.D;
  const float scale = p.scale;
  const Strides st(p);
  const int64_t Dp = round_up(D, kNR), NKp = round_up(NK, kNR);
  const int64_t BH = B * H;
  if (BH == 0 || N == 0) return kOk;
  // Enough tasks to keep every thread busy when B * H is small; each re-packs K and V, which
  // costs NK * D against the task's 4 * rows * NK * D flops.
  const int64_t blocks = (N + kMR - 1) / kMR;
  int64_t splits = (4 * static_cast<int64_t>(num_threads) + BH - 1) / BH;
  splits = splits < 1 ? 1 : (splits > blocks ? blocks : splits);
  const int64_t blocks_per_split = (blocks + splits - 1) / splits;
  int failed = 0;
  parallel_region(num_threads, [&] {
    FloatBuffer kt_buf(D * NKp), v_buf(NK * Dp), q_buf(kMR * Dp), s_buf(kMR * NKp),
        o_buf(kMR * Dp);
    const bool ok = !(kt_buf.failed() || v_buf.failed() || q_buf.failed() || s_buf.failed() ||
                      o_buf.failed());
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    }
    float *kt = kt_buf.data(), *vp = v_buf.data(), *qb = q_buf.data(), *s = s_buf.data(),
          *ob = o_buf.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < BH * splits; ++task) {
      if (!ok) continue;
      const int64_t bh = task / splits, b = bh / H, h = bh % H;
      const int64_t first = (task % splits) * blocks_per_split * kMR;
      const int64_t last = min_i64(N, first + blocks_per_split * kMR);
      if (first >= last) continue;
      pack_transposed(k + st.k.row(b, h, 0), st.k.n, NK, D, kt, NKp);
      pack_rows(v + st.v.row(b, h, 0), st.v.n, NK, D, 1.0f, vp, Dp);
      for (int64_t i0 = first; i0 < last; i0 += kMR) {
        const int64_t rows = min_i64(kMR, last - i0);
        const T* q_rows = q + st.q.row(b, h, i0);
        pack_rows(q_rows, st.q.n, rows, D, scale, qb, Dp);
        // The next block's queries: strided rows the hardware prefetcher does not foresee.
        for (int64_t r = kMR; r < min_i64(2 * kMR, last - i0); ++r)
          for (int64_t d = 0; d < D; d += 64 / static_cast<int64_t>(sizeof(T)))
            __builtin_prefetch(q_rows + r * st.q.n + d);
        gemm<false>(rows, NKp, D, qb, Dp, 1, kt, NKp, s, NKp);  // scaled scores
        float row_max[kMR], row_sum[kMR];
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s + r * NKp;
          float m = sr[0];
#pragma omp simd reduction(max : m)
          for (int64_t j = 0; j < NK; ++j) m = sr[j] > m ? sr[j] : m;
          float l = 0.0f;
#pragma omp simd reduction(+ : l)
          for (int64_t j = 0; j < NK; ++j) {
            sr[j] = exp_nonpositive(sr[j] - m);
            l += sr[j];
          }
          row_max[r] = m;
          row_sum[r] = l;
        }
        gemm<false>(rows, Dp, NK, s, NKp, 1, vp, Dp, ob, Dp);  // unnormalised P V
        for (int64_t r = 0; r < rows; ++r) {
          const float inv = 1.0f / row_sum[r];
          T* o = out + st.out.row(b, h, i0 + r);
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(ob[r * Dp + d] * inv);
          lse[bh * N + i0 + r] = (row_max[r] + logf(row_sum[r])) * kLog2e;
        }
      }
    }
  });
  return failed ? kOutOfMemory : kOk;
}

// ---- backward -------------------------------------------------------------------------------

template <typename T>
int bwd(const AttentionBwdParams& p, int num_threads) {
  const T* dout = static_cast<const T*>(p.dout);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const float* lse = p.lse;
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  const int64_t B = p.B, H = p.H, N = p.N, NK = p.NK, D = p.D;
  const float scale = p.scale;
  const Strides st(p);
  const int64_t Dp = round_up(D, kNR);
  const int64_t KC = min_i64(kKeyChunk, round_up(NK, kNR));  // padded chunk width
  const int64_t QB = kQueryBlock;
  if (B * H == 0 || N == 0) return kOk;
  int failed = 0;
  parallel_region(num_threads, [&] {
    FloatBuffer kt_buf(D * KC), vt_buf(D * KC), kr_buf(KC * Dp), dk_buf(KC * Dp),
        dv_buf(KC * Dp), q_buf(QB * Dp), do_buf(QB * Dp), p_buf(QB * KC), ds_buf(QB * KC),
        dq_buf(N * Dp), stat_buf(2 * QB);
    const bool ok = !(kt_buf.failed() || vt_buf.failed() || kr_buf.failed() ||
                      dk_buf.failed() || dv_buf.failed() || q_buf.failed() || do_buf.failed() ||
                      p_buf.failed() || ds_buf.failed() || dq_buf.failed() || stat_buf.failed());
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    }
    float *kt = kt_buf.data(), *vt = vt_buf.data(), *kr = kr_buf.data(), *dkc = dk_buf.data(),
          *dvc = dv_buf.data(), *qb = q_buf.data(), *dob = do_buf.data(), *p = p_buf.data(),
          *ds = ds_buf.data(), *dqa = dq_buf.data();
    float* lse_nat = stat_buf.data();
    float* delta = lse_nat == nullptr ? nullptr : lse_nat + QB;
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      if (!ok) continue;
      const int64_t b = bh / H, h = bh % H;
      const T* qh = q + st.q.row(b, h, 0);
      const T* kh = k + st.k.row(b, h, 0);
      const T* vh = v + st.v.row(b, h, 0);
      std::memset(dqa, 0, N * Dp * sizeof(float));
      for (int64_t j0 = 0; j0 < NK; j0 += KC) {
        const int64_t keys = min_i64(KC, NK - j0);
        const int64_t keys_p = round_up(keys, kNR);
        pack_transposed(kh + j0 * st.k.n, st.k.n, keys, D, kt, keys_p);
        pack_transposed(vh + j0 * st.v.n, st.v.n, keys, D, vt, keys_p);
        pack_rows(kh + j0 * st.k.n, st.k.n, keys, D, 1.0f, kr, Dp);
        std::memset(dkc, 0, keys * Dp * sizeof(float));
        std::memset(dvc, 0, keys * Dp * sizeof(float));
        for (int64_t i0 = 0; i0 < N; i0 += QB) {
          const int64_t rows = min_i64(QB, N - i0);
          pack_rows(qh + i0 * st.q.n, st.q.n, rows, D, 1.0f, qb, Dp);
          pack_rows(dout + st.dout.row(b, h, i0), st.dout.n, rows, D, 1.0f, dob, Dp);
          for (int64_t r = 0; r < rows; ++r) {
            const T* o = out + st.out.row(b, h, i0 + r);
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < D; ++d) acc += dob[r * Dp + d] * to_float(o[d]);
            delta[r] = acc;  // rowsum(dO * O)
            lse_nat[r] = lse[bh * N + i0 + r] * kLn2;
          }
          gemm<false>(rows, keys_p, D, qb, Dp, 1, kt, keys_p, p, keys_p);    // Q K^T
          gemm<false>(rows, keys_p, D, dob, Dp, 1, vt, keys_p, ds, keys_p);  // dO V^T
          for (int64_t r = 0; r < rows; ++r) {
            float* pr = p + r * keys_p;
            float* dsr = ds + r * keys_p;
            const float l = lse_nat[r], dl = delta[r];
#pragma omp simd
            for (int64_t j = 0; j < keys; ++j) {
              pr[j] = exp_poly(pr[j] * scale - l);
              dsr[j] = pr[j] * (dsr[j] - dl);
            }
          }
          // Columns past `keys` in p and ds are padding: every product below stops at `keys`.
          gemm<true>(keys, Dp, rows, p, 1, keys_p, dob, Dp, dvc, Dp);        // dV += P^T dO
          gemm<true>(keys, Dp, rows, ds, 1, keys_p, qb, Dp, dkc, Dp);        // dK += dS^T Q
          gemm<true>(rows, Dp, keys, ds, keys_p, 1, kr, Dp, dqa + i0 * Dp, Dp);  // dQ += dS K
        }
        for (int64_t j = 0; j < keys; ++j) {
          T* dkr = dk + (bh * NK + j0 + j) * D;
          T* dvr = dv + (bh * NK + j0 + j) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            dkr[d] = from_float<T>(dkc[j * Dp + d] * scale);
            dvr[d] = from_float<T>(dvc[j * Dp + d]);
          }
        }
      }
      for (int64_t i = 0; i < N; ++i) {
        T* dqr = dq + (bh * N + i) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dqr[d] = from_float<T>(dqa[i * Dp + d] * scale);
      }
    }
  });
  return failed ? kOutOfMemory : kOk;
}

template <typename P>
bool bad_sizes(const P& p) {
  return p.B < 0 || p.H < 0 || p.N < 0 || p.NK < 1 || p.D < 1;
}

}  // namespace

int attention_fwd(const AttentionFwdParams& p, int num_threads) {
  if (bad_sizes(p)) return kBadSize;
  num_threads = threads_for(num_threads, p.B * p.H * p.N * p.NK);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return fwd<T>(p, num_threads));
}

int attention_bwd(const AttentionBwdParams& p, int num_threads) {
  if (bad_sizes(p)) return kBadSize;
  num_threads = threads_for(num_threads, p.B * p.H * p.N * p.NK);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return bwd<T>(p, num_threads));
}

}  // namespace onestep::cpu::ONESTEP_ISA
