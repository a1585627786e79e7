// The fc1 epilogue of a DiT MLP: y = gelu_tanh(x + bias), forward and backward.
// x is (R, F) row-major (rows = every token of every sample), bias is (F). The backward gives
// dx = dy * gelu'(x + bias) and dbias = sum over rows of dx, summed in fixed chunks of rows so
// the result does not depend on the thread count. Compiled once per ISA.
#include <cstdint>
#include <type_traits>

#include <omp.h>

#include "../common/math.h"
#include "../common/status.h"
#include "dtype.h"
#include "kernels.h"
#include "memory.h"
#include "row.h"

namespace onestep::cpu::ONESTEP_ISA {
namespace {

constexpr int64_t kRowsPerChunk = 64;

template <typename T>
int fwd(const BiasGeluTanhFwdParams& p, int num_threads) {
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t R = p.R, F = p.F;
  advise_huge_pages(y, R * F * static_cast<int64_t>(sizeof(T)));
  FloatBuffer bias_f(F);  // bias as fp32, converted once
  if (bias_f.failed()) return kOutOfMemory;
  for (int64_t f = 0; f < F; ++f) bias_f.data()[f] = to_float(bias[f]);
  const float* b = bias_f.data();
  parallel_for(num_threads, R, [&](int64_t r) {
    const T* xr = x + r * F;
    T* yr = y + r * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) yr[f] = from_float<T>(gelu_tanh(to_float(xr[f]) + b[f]));
  });
  return kOk;
}

template <typename T>
int bwd(const BiasGeluTanhBwdParams& p, int num_threads) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* dx = static_cast<T*>(p.dx);
  T* dbias = static_cast<T*>(p.dbias);
  const int64_t R = p.R, F = p.F;
  advise_huge_pages(dx, R * F * static_cast<int64_t>(sizeof(T)));
  const int64_t chunks = (R + kRowsPerChunk - 1) / kRowsPerChunk;
  FloatBuffer bias_f(F);
  FloatBuffer partial(chunks * F, /*zero=*/true);
  if (bias_f.failed() || partial.failed()) return kOutOfMemory;
  for (int64_t f = 0; f < F; ++f) bias_f.data()[f] = to_float(bias[f]);
  const float* b = bias_f.data();
  parallel_for(num_threads, chunks, [&](int64_t c) {
    float* acc = partial.data() + c * F;
    const int64_t r_end = min_i64(R, (c + 1) * kRowsPerChunk);
    for (int64_t r = c * kRowsPerChunk; r < r_end; ++r) {
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) {
        const float u = to_float(x[r * F + f]) + b[f];
        const float g = to_float(dy[r * F + f]) * gelu_tanh_grad(u, gelu_tanh_gate(u));
        dx[r * F + f] = from_float<T>(g);
        acc[f] += g;
      }
    }
  });
  // dbias: add the chunk partials in chunk order, feature blocks in parallel.
  parallel_for(num_threads, (F + 255) / 256, [&](int64_t block) {
    const int64_t f0 = block * 256, f1 = min_i64(F, f0 + 256);
    for (int64_t c = 1; c < chunks; ++c) {
      const float* part = partial.data() + c * F;
#pragma omp simd
      for (int64_t f = f0; f < f1; ++f) partial.data()[f] += part[f];
    }
    for (int64_t f = f0; f < f1; ++f) dbias[f] = from_float<T>(chunks > 0 ? partial.data()[f] : 0.0f);
  });
  return kOk;
}

}  // namespace

int bias_gelu_tanh_fwd(const BiasGeluTanhFwdParams& p, int num_threads) {
  if (p.R < 0 || p.F <= 0) return kBadSize;
  if (p.R == 0) return kOk;
  num_threads = threads_for(num_threads, p.R * p.F);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return fwd<T>(p, num_threads));
}

int bias_gelu_tanh_bwd(const BiasGeluTanhBwdParams& p, int num_threads) {
  if (p.R < 0 || p.F <= 0) return kBadSize;
  num_threads = threads_for(num_threads, p.R * p.F);
  ONESTEP_CPU_DTYPE_SWITCH(p.dtype, T, return bwd<T>(p, num_threads));
}

}  // namespace onestep::cpu::ONESTEP_ISA
