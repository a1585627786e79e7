// Row helpers shared by the CPU kernels. Each kernel file is compiled once per instruction
// set, so everything here has internal linkage, and kernel files use no std:: containers
// (an out-of-line template instance from the AVX2 object could be picked by the linker for
// the portable code and fault on a CPU without AVX).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <omp.h>

#include "dtype.h"

#include <cstdlib>

namespace onestep::cpu::ONESTEP_ISA {
namespace {

// A malloc'd array of floats, freed on scope exit; data() is null if allocation failed.
class FloatBuffer {
 public:
  explicit FloatBuffer(int64_t count, bool zero = false)
      : data_(count <= 0 ? nullptr
                         : static_cast<float*>(zero ? std::calloc(static_cast<size_t>(count), sizeof(float))
                                                    : std::malloc(static_cast<size_t>(count) * sizeof(float)))),
        wanted_(count > 0) {}
  ~FloatBuffer() { std::free(data_); }
  FloatBuffer(const FloatBuffer&) = delete;
  FloatBuffer& operator=(const FloatBuffer&) = delete;
  float* data() const { return data_; }
  bool failed() const { return wanted_ && data_ == nullptr; }

 private:
  float* data_;
  bool wanted_;
};

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// The distance between two threads' scratch rows of D floats: D rounded up to a cache line
// (16 floats) plus one line, so that no two threads ever write the same line. With rows
// packed D apart, at D = 48 the threads' rows shared a line and two threads ran a LayerNorm
// pass 1.4-1.7x slower than one (false sharing, dev VM).
inline int64_t scratch_stride(int64_t D) { return (D + 15) / 16 * 16 + 16; }

// Threads for `elements` of memory-bound work: OpenMP's fork and join cost a microsecond or
// two, more than a small call's whole work, so small calls run on one thread.
constexpr int64_t kSerialElements = int64_t{1} << 15;
inline int threads_for(int num_threads, int64_t elements) {
  return elements < kSerialElements || num_threads < 1 ? 1 : num_threads;
}

// body(i) for i in [0, count), split statically over num_threads OpenMP threads. One thread
// runs the loop right here: entering a parallel region costs ~0.6 us even for a team of one
// (libgomp, dev VM), as much as the rest of a small call's launch.
template <typename Body>
inline void parallel_for(int num_threads, int64_t count, const Body& body) {
  if (num_threads <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < count; ++i) body(i);
}

// region() as one OpenMP parallel region on num_threads threads, or called right here when
// there is one thread (a region for a team of one costs ~0.6 us); worksharing loops inside
// region() are orphaned: they bind to the region, or run on this thread alone without one.
template <typename Region>
inline void parallel_region(int num_threads, const Region& region) {
  if (num_threads <= 1) {
    region();
    return;
  }
#pragma omp parallel num_threads(num_threads)
  region();
}

// parallel_for that also tells the body its thread (body(i, thread): per-thread scratch rows)
// and runs finish() on each thread after its share (a fence after streaming stores).
template <typename Body, typename Finish>
inline void parallel_for_threads(int num_threads, int64_t count, const Body& body,
                                 const Finish& finish) {
  parallel_region(num_threads, [&] {
    const int thread = omp_get_thread_num();  // (0 outside a region)
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < count; ++i) body(i, thread);
    finish();
  });
}

// fp32 outputs at least this large are written with streaming (non-temporal) stores: they do
// not fit in cache for the next op anyway, and streaming skips reading each line before
// writing it. Below it, ordinary stores leave the output in cache for the consumer.
constexpr int64_t kStreamingBytes = int64_t{16} << 20;

// Copies a row of floats to dst with non-temporal stores where the ISA has them.
inline void stream_row(float* dst, const float* src, int64_t D) {
  int64_t d = 0;
#if defined(__AVX2__)
  for (; d < D && (reinterpret_cast<uintptr_t>(dst + d) & 31u) != 0; ++d) dst[d] = src[d];
  for (; d + 8 <= D; d += 8) _mm256_stream_ps(dst + d, _mm256_loadu_ps(src + d));
#endif
  for (; d < D; ++d) dst[d] = src[d];
}

inline void stream_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

// Sums over a row: fp32 SIMD partial sums over blocks of kSumBlock elements, the blocks'
// totals added in double. A plain running sum over a row of D values loses about D * eps of
// relative accuracy (2e-4 at D = 2^20, 5e-3 for values around 1000 at D = 65536); this keeps
// the LayerNorm statistics within PyTorch's accuracy at any width for the cost of one double
// addition per block.
constexpr int64_t kSumBlock = 256;

template <typename Term>
inline double blocked_sum(int64_t D, Term term) {
  double total = 0.0;
  for (int64_t d0 = 0; d0 < D; d0 += kSumBlock) {
    const int64_t d1 = min_i64(D, d0 + kSumBlock);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t d = d0; d < d1; ++d) part += term(d);
    total += static_cast<double>(part);
  }
  return total;
}

// Returns the row as floats: the input itself for fp32, else converted into `buf`.
template <typename T>
inline const float* row_as_float(const T* row, int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) buf[d] = to_float(row[d]);
    return buf;
  }
}

// The last step of a deterministic per-sample weight gradient: `partial` holds, for each
// sample b and chunk c of its rows, K sums of D floats ((B, chunks, K, D), row-major). Adds
// each sample's chunks in chunk order and writes its k-th sum to outputs[k] + b * D. With no
// chunks (N == 0) the sums are zero.
template <typename T, int K>
void reduce_chunk_partials(float* partial, int64_t B, int64_t chunks, int64_t D,
                           T* const (&outputs)[K], int num_threads) {
  const int64_t width = K * D;
  parallel_for(num_threads, B, [&](int64_t b) {
    if (chunks == 0) {
      for (int k = 0; k < K; ++k)
        for (int64_t d = 0; d < D; ++d) outputs[k][b * D + d] = from_float<T>(0.0f);
      return;
    }
    float* acc = partial + b * chunks * width;
    for (int64_t c = 1; c < chunks; ++c) {
      const float* part = acc + c * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) acc[i] += part[i];
    }
    for (int k = 0; k < K; ++k) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) outputs[k][b * D + d] = from_float<T>(acc[k * D + d]);
    }
  });
}

}  // namespace
}  // namespace onestep::cpu::ONESTEP_ISA
