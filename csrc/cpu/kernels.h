// Declarations of the CPU launchers. Each kernel file is compiled once per instruction set
// (namespace `base`, portable; namespace `avx2`, -mavx2 -mfma -mf16c on x86-64) and the
// un-namespaced entry points in dispatch.cpp pick one at run time.
//
// Conventions: pointers are raw, sizes and strides are in elements, strides of x and of the
// modulation tensors are given for the (B, N) dimensions (the last dimension is contiguous;
// a stride of 0 broadcasts, which is how per-sample modulation is expressed). Outputs are
// contiguous. Every launcher returns an onestep::Status.
#pragma once

#include <cstdint>

#define ONESTEP_CPU_DECLARE_KERNELS                                                          \
  int layernorm_modulate_fwd(const void* x, const void* shift, const void* scale, void* out, \
                             float* mean, float* rstd, int64_t B, int64_t N, int64_t D,      \
                             int64_t x_sb, int64_t x_sn, int64_t shift_sb, int64_t shift_sn, \
                             int64_t scale_sb, int64_t scale_sn, int dtype, float eps,       \
                             int num_threads);                                               \
  int layernorm_modulate_bwd(const void* dy, const void* x, const void* scale,               \
                             const float* mean, const float* rstd, void* dx, void* dshift,   \
                             void* dscale, int64_t B, int64_t N, int64_t D, int64_t x_sb,    \
                             int64_t x_sn, int64_t scale_sb, int64_t scale_sn,               \
                             int per_token, int dtype, int num_threads);                     \
  /* mod_strides: (B, N) strides of gate, shift, scale, in that order (6 values) */          \
  int gated_residual_layernorm_modulate_fwd(                                                 \
      const void* x, const void* y, const void* gate, const void* shift, const void* scale,  \
      void* res, void* out, float* mean, float* rstd, int64_t B, int64_t N, int64_t D,       \
      const int64_t* mod_strides, int dtype, float eps, int num_threads);                    \
  int gated_residual_layernorm_modulate_bwd(                                                 \
      const void* dres, const void* dout, const void* res, const void* y, const void* gate,  \
      const void* scale, const float* mean, const float* rstd, void* dx, void* dy,           \
      void* dgate, void* dshift, void* dscale, int64_t B, int64_t N, int64_t D,              \
      const int64_t* mod_strides, int per_token, int dtype, int num_threads);                \
  int bias_gelu_tanh_fwd(const void* x, const void* bias, void* y, int64_t R, int64_t F,     \
                         int dtype, int num_threads);                                        \
  int bias_gelu_tanh_bwd(const void* dy, const void* x, const void* bias, void* dx,          \
                         void* dbias, int64_t R, int64_t F, int dtype, int num_threads);     \
  /* strides: (B, H, N) strides of q, k, v, out (12 values), then dout (bwd, 15) */         \
  int attention_fwd(const void* q, const void* k, const void* v, void* out, float* lse,      \
                    int64_t B, int64_t H, int64_t N, int64_t NK, int64_t D,                  \
                    const int64_t* strides, float scale, int dtype, int num_threads);        \
  int attention_bwd(const void* dout, const void* q, const void* k, const void* v,           \
                    const void* out, const float* lse, void* dq, void* dk, void* dv,         \
                    int64_t B, int64_t H, int64_t N, int64_t NK, int64_t D,                  \
                    const int64_t* strides, float scale, int dtype, int num_threads);

namespace onestep::cpu {
namespace base {
ONESTEP_CPU_DECLARE_KERNELS
}
namespace avx2 {
ONESTEP_CPU_DECLARE_KERNELS
}
// Run-time choice between the two; see dispatch.cpp.
ONESTEP_CPU_DECLARE_KERNELS
// "avx2" or "base": the instruction set the entry points above use in this process.
const char* active_isa();
// Whether this build contains the avx2 variant.
bool has_avx2_build();
}  // namespace onestep::cpu
