// How the memory-bound CUDA kernels lay a tile of rows over a block, shared by the LayerNorm
// kernels and bias+GELU. Header-only (each .cu is compiled whole, without -rdc).
//
// A block of kThreads threads is `groups` row groups of `columns` threads. Column thread j of
// a group holds the row's 16-byte vectors j, j + columns, j + 2 columns, ... (consecutive
// threads read consecutive vectors: coalesced 128-bit accesses). `columns` is the power of two
// (8..kThreads) whose vectors tile the row best (RowTile::plan), so that few lanes idle at the
// widths of real models: 16 at the SLT's 384 in bf16 (three vectors each, two rows per warp),
// 32 at DiT-XL/2's 1152 (90% useful), 64 at SD3's 1536, SD3.5-Large's 2432 (95%), 128 at
// Flux's 3072. Rows whose width or pointers do not allow 16-byte vectors run the same code
// with one element per vector (the `Vec` template argument).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../common/status.h"
#include "block_reduce.cuh"

namespace onestep::cuda {

constexpr int kThreads = 256;        // per block (up to 255 registers per thread)
constexpr int kMinColumns = 8;
constexpr int kMaxVectorsPerThread = 8;   // a row held in registers: vectors per thread
constexpr int kMaxScalarsPerThread = 32;  // ... where a "vector" is one element
constexpr float kMinUsefulLanes = 0.85f;

struct RowTile {
  int columns;  // threads per row, a power of two
  int vectors;  // vectors per thread and row (the last ones masked where the row is short)
  int width;    // elements per vector: 16 bytes' worth, or 1

  __host__ __device__ int groups() const { return kThreads / columns; }

  // The tile for rows of D elements: the widest `columns` whose vectors are at least
  // kMinUsefulLanes useful, within `max_vectors` per thread; else the most useful.
  // columns 0: no tile holds such rows (D beyond kThreads * max_vectors * width).
  static RowTile plan(int64_t D, int width, int max_vectors) {
    const int64_t count = (D + width - 1) / width;
    RowTile best{0, 0, width};
    double best_share = -1.0;
    for (int columns = kThreads; columns >= kMinColumns; columns /= 2) {
      const int64_t vectors = (count + columns - 1) / columns;
      if (vectors > max_vectors) break;
      const double share = static_cast<double>(count) / static_cast<double>(vectors * columns);
      if (share >= kMinUsefulLanes) return RowTile{columns, static_cast<int>(vectors), width};
      if (share > best_share) {
        best_share = share;
        best = RowTile{columns, static_cast<int>(vectors), width};
      }
    }
    return best;
  }

  // The tile of a kernel that holds a row in registers: 16-byte vectors of `vector` elements
  // where `vectors_fit`, else (or where no vector tile holds the row) one element per vector.
  static RowTile held(int64_t D, int vector, bool vectors_fit) {
    RowTile tile{0, 0, 1};
    if (vectors_fit) tile = plan(D, vector, kMaxVectorsPerThread);
    return tile.columns != 0 ? tile : plan(D, 1, kMaxScalarsPerThread);
  }
};

// The values of a row one thread holds in registers at most, with W elements per vector.
template <int W>
constexpr int kRowValues = W == 1 ? kMaxScalarsPerThread : kMaxVectorsPerThread * W;

// 16-byte vectors of T and their conversion through float.
template <typename T>
constexpr int kVector = 16 / static_cast<int>(sizeof(T));

template <int W, typename T>
__device__ __forceinline__ void load_vector(const T* p, float (&out)[W]) {
  if constexpr (W == 1) {
    out[0] = load(p);
  } else {
    static_assert(W * sizeof(T) == 16, "a vector is 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < W; ++j) out[j] = load(e + j);
  }
}

// Two floats rounded to T and packed in 32 bits (the halves of a 16-byte vector store).
__device__ __forceinline__ uint32_t pack_pair(float a, float b, const __half*) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack_pair(float a, float b, const __nv_bfloat16*) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// One 16-byte global store of four 32-bit words. Written in PTX: NVVM split a float4 or
// uint4 store in the unrolled forward loops into four 32-bit stores.
__device__ __forceinline__ void store_words(void* p, uint32_t a, uint32_t b, uint32_t c,
                                            uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

// One 16-byte store of W values rounded to T.
template <int W, typename T>
__device__ __forceinline__ void store_vector(T* p, const float (&v)[W]) {
  if constexpr (W == 1) {
    store(p, v[0]);
  } else if constexpr (sizeof(T) == 4) {
    static_assert(W == 4, "a vector is 16 bytes");
    store_words(p, __float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                __float_as_uint(v[3]));
  } else {
    static_assert(W == 8, "a vector is 16 bytes");
    const T* tag = nullptr;
    store_words(p, pack_pair(v[0], v[1], tag), pack_pair(v[2], v[3], tag),
                pack_pair(v[4], v[5], tag), pack_pair(v[6], v[7], tag));
  }
}

// W floats as W / 4 16-byte stores (fp32 partial sums), or one by one where W < 4.
template <int W>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int j = 0; j < W; j += 4)
      store_words(p + j, __float_as_uint(v[j]), __float_as_uint(v[j + 1]),
                  __float_as_uint(v[j + 2]), __float_as_uint(v[j + 3]));
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = v[j];
  }
}

// The sum of v over the `columns` threads of this thread's row group, returned to each of them.
// Called by every thread of the block (`columns` is the same for all): shuffles within a
// warp, then shared memory across the warps of a group wider than one.
__device__ __forceinline__ float group_sum(float v, int columns) {
  __shared__ float warp_sums[kThreads / 32];
  const int lanes = columns < 32 ? columns : 32;
  for (int offset = lanes / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (columns <= 32) return v;
  const int warp = threadIdx.x / 32, per_group = columns / 32;
  __syncthreads();  // (the previous call's readers are done)
  if (threadIdx.x % 32 == 0) warp_sums[warp] = v;
  __syncthreads();
  const int first = warp / per_group * per_group;
  float total = 0.0f;
  for (int w = 0; w < per_group; ++w) total += warp_sums[first + w];
  return total;
}

// Chan's merge of the Welford states of the `columns` threads of a row group (the shared
// csrc/common merge), returned to each of them; the same calling rule as group_sum.
__device__ __forceinline__ Welford group_welford(Welford w, int columns) {
  __shared__ Welford warp_states[kThreads / 32];
  const int lanes = columns < 32 ? columns : 32;
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    Welford other;
    other.mean = __shfl_xor_sync(0xffffffffu, w.mean, offset);
    other.m2 = __shfl_xor_sync(0xffffffffu, w.m2, offset);
    other.count = __shfl_xor_sync(0xffffffffu, w.count, offset);
    w = onestep::welford_merge(w, other);
  }
  if (columns <= 32) return w;
  const int warp = threadIdx.x / 32, per_group = columns / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) warp_states[warp] = w;
  __syncthreads();
  const int first = warp / per_group * per_group;
  Welford total = warp_states[first];
  for (int i = 1; i < per_group; ++i) total = onestep::welford_merge(total, warp_states[first + i]);
  return total;
}

// The Welford state of the `count` values in v (two passes: mean, then squared deviations;
// one division per thread, none per element).
template <int N>
__device__ __forceinline__ Welford thread_welford(const float (&v)[N], const bool (&valid)[N]) {
  float sum = 0.0f, count = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    sum += valid[i] ? v[i] : 0.0f;
    count += valid[i] ? 1.0f : 0.0f;
  }
  const float mean = count > 0.0f ? sum / count : 0.0f;
  float m2 = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = valid[i] ? v[i] - mean : 0.0f;
    m2 += d * d;
  }
  return Welford{mean, m2, count};
}

// The sum over the row groups of a block of each column thread's W floats (per-sample partial
// sums of the rows a block holds), in group order (deterministic), written by group 0's
// threads to `out`. Called by every thread of the block.
template <int W>
__device__ __forceinline__ void sum_over_groups(const float (&v)[W], int columns, bool write,
                                                float* out) {
  __shared__ float staged[kThreads * (W < 8 ? 8 : W)];
  __syncthreads();
#pragma unroll
  for (int j = 0; j < W; ++j) staged[threadIdx.x * W + j] = v[j];
  __syncthreads();
  if (threadIdx.x < columns && write) {
    float total[W];
#pragma unroll
    for (int j = 0; j < W; ++j) total[j] = 0.0f;
    for (int g = 0; g < kThreads / columns; ++g) {
#pragma unroll
      for (int j = 0; j < W; ++j) total[j] += staged[(g * columns + threadIdx.x) * W + j];
    }
    store_floats<W>(out, total);
  }
}

// A backward block's rows: Rows rows of one sample, tokens first_n, first_n + 1, ...; row
// group `group` holds the block's rows group, group + groups, ... (RPG of them). Their mean
// and rstd, and after the first walk their means of g and g xhat, are the same for every
// column thread of a row: kept once per block in shared memory (in each thread's registers the
// gated backward spilled).
template <int Rows, int RPG>
struct BlockRows {
  int group, groups;
  int64_t first_n, first_row;
  bool ok[RPG];
  float* mean;     // [Rows] each, in shared memory
  float* rstd;
  float* mean_g;
  float* mean_gx;

  __device__ int local(int r) const { return group + r * groups; }
  __device__ int64_t row(int r) const { return first_row + local(r); }    // in B * N
  __device__ int64_t token(int r) const { return first_n + local(r); }    // in N

  // Called by every thread of the block (it synchronises it).
  __device__ BlockRows(const float* means, const float* rstds, int64_t b, int64_t chunk,
                       int64_t N, const RowTile& tile) {
    __shared__ float stats[4][Rows];
    mean = stats[0];
    rstd = stats[1];
    mean_g = stats[2];
    mean_gx = stats[3];
    group = threadIdx.x / tile.columns;
    groups = tile.groups();
    first_n = chunk * Rows;
    first_row = b * N + first_n;
    if (threadIdx.x < Rows) {
      const bool valid = first_n + threadIdx.x < N;
      mean[threadIdx.x] = valid ? means[first_row + threadIdx.x] : 0.0f;
      rstd[threadIdx.x] = valid ? rstds[first_row + threadIdx.x] : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < RPG; ++r) ok[r] = local(r) < Rows && token(r) < N;
    __syncthreads();
  }

  // The rows' means of g and g xhat from each thread's sums over its vectors (sum_g, sum_gx),
  // into shared memory. Called by every thread of the block.
  __device__ void finish_sums(const float (&sum_g)[RPG], const float (&sum_gx)[RPG],
                              int columns, int64_t D) const {
    const float inv_d = 1.0f / static_cast<float>(D);
#pragma unroll
    for (int r = 0; r < RPG; ++r) {
      const float g = group_sum(sum_g[r], columns) * inv_d;
      const float gx = group_sum(sum_gx[r], columns) * inv_d;
      if (threadIdx.x % columns == 0 && local(r) < Rows) {
        mean_g[local(r)] = g;
        mean_gx[local(r)] = gx;
      }
    }
    __syncthreads();
  }
};

// Calls launch(std::integral_constant<int, RPG>) with RPG = rows / tile.groups() (at least 1),
// the rows each row group of a block of `rows` rows takes: the backward kernels keep that many
// rows' statistics and sums in registers, sized at compile time. False if no case matches.
template <int Rows, typename Launch>
bool launch_rows(const RowTile& tile, Launch launch) {
  const int per_group = Rows / tile.groups() > 0 ? Rows / tile.groups() : 1;
  switch (per_group) {
    case 1: launch(std::integral_constant<int, 1>{}); return true;
    case 2: launch(std::integral_constant<int, 2>{}); return true;
    case 4: launch(std::integral_constant<int, 4>{}); return true;
    case 8: launch(std::integral_constant<int, 8>{}); return true;
    case 16: launch(std::integral_constant<int, 16>{}); return true;
    default: return false;
  }
}

// Adds up per-block partial sums: out[p, b, d] = sum over c of partials[p, b, c, d] (fp32, in
// order c = 0, 1, ...: deterministic), rounded once to T. One thread per (p, b, d).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_up_partials_kernel(const float* __restrict__ partials, int64_t planes, int64_t B,
                           int64_t chunks, int64_t D, T* out0, T* out1, T* out2) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= planes * B * D) return;
  const int64_t plane = i / (B * D), rest = i - plane * B * D, b = rest / D, d = rest - b * D;
  const float* p = partials + ((plane * B + b) * chunks) * D + d;
  float total = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) total += p[c * D];
  T* out = plane == 0 ? out0 : (plane == 1 ? out1 : out2);
  store(out + b * D + d, total);
}

template <typename T>
int add_up_partials(const float* partials, int64_t planes, int64_t B, int64_t chunks, int64_t D,
                    void* out0, void* out1, void* out2, cudaStream_t stream) {
  const int64_t total = planes * B * D;
  add_up_partials_kernel<T><<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads,
                              0, stream>>>(partials, planes, B, chunks, D, static_cast<T*>(out0),
                                           static_cast<T*>(out1), static_cast<T*>(out2));
  return cudaGetLastError() == cudaSuccess ? onestep::kOk : onestep::kCudaError;
}

inline int launch_status() {
  return cudaGetLastError() == cudaSuccess ? onestep::kOk : onestep::kCudaError;
}

// Whether every pointer is 16-byte aligned and every size and stride a whole number of
// vectors of `width` elements: then the kernels move 16-byte vectors.
inline bool vectors_fit(int width, std::initializer_list<const void*> pointers,
                        std::initializer_list<int64_t> counts) {
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int64_t n : counts)
    if (n % width != 0) return false;
  return true;
}

}  // namespace onestep::cuda
