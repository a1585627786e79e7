// Run-time choice of the instruction set for the CPU kernels: avx2 when this build has it and
// the processor supports AVX2, FMA and F16C, unless ONESTEP_CPU_ISA=base asks for the portable
// variant (the tests run both).
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace onestep::cpu {

bool has_avx2_build() {
#ifdef ONESTEP_HAVE_AVX2_BUILD
  return true;
#else
  return false;
#endif
}

namespace {
bool choose_avx2() {
  const char* forced = std::getenv("ONESTEP_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "base") == 0) return false;
#if defined(ONESTEP_HAVE_AVX2_BUILD)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}
}  // namespace

const char* active_isa() { return choose_avx2() ? "avx2" : "base"; }

#if defined(ONESTEP_HAVE_AVX2_BUILD)
#define ONESTEP_PICK(fn, ...) (choose_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define ONESTEP_PICK(fn, ...) base::fn(__VA_ARGS__)
#endif

int layernorm_modulate_fwd(const void* x, const void* shift, const void* scale, void* out,
                           float* mean, float* rstd, int64_t B, int64_t N, int64_t D,
                           int64_t x_sb, int64_t x_sn, int64_t shift_sb, int64_t shift_sn,
                           int64_t scale_sb, int64_t scale_sn, int dtype, float eps,
                           int num_threads) {
  return ONESTEP_PICK(layernorm_modulate_fwd, x, shift, scale, out, mean, rstd, B, N, D, x_sb,
                      x_sn, shift_sb, shift_sn, scale_sb, scale_sn, dtype, eps, num_threads);
}

int layernorm_modulate_bwd(const void* dy, const void* x, const void* scale, const float* mean,
                           const float* rstd, void* dx, void* dshift, void* dscale, int64_t B,
                           int64_t N, int64_t D, int64_t x_sb, int64_t x_sn, int64_t scale_sb,
                           int64_t scale_sn, int per_token, int dtype, int num_threads) {
  return ONESTEP_PICK(layernorm_modulate_bwd, dy, x, scale, mean, rstd, dx, dshift, dscale, B, N,
                      D, x_sb, x_sn, scale_sb, scale_sn, per_token, dtype, num_threads);
}

int gated_residual_layernorm_modulate_fwd(const void* x, const void* y, const void* gate,
                                          const void* shift, const void* scale, void* res,
                                          void* out, float* mean, float* rstd, int64_t B,
                                          int64_t N, int64_t D, const int64_t* mod_strides,
                                          int dtype, float eps, int num_threads) {
  return ONESTEP_PICK(gated_residual_layernorm_modulate_fwd, x, y, gate, shift, scale, res, out,
                      mean, rstd, B, N, D, mod_strides, dtype, eps, num_threads);
}

int gated_residual_layernorm_modulate_bwd(const void* dres, const void* dout, const void* res,
                                          const void* y, const void* gate, const void* scale,
                                          const float* mean, const float* rstd, void* dx,
                                          void* dy, void* dgate, void* dshift, void* dscale,
                                          int64_t B, int64_t N, int64_t D,
                                          const int64_t* mod_strides, int per_token, int dtype,
                                          int num_threads) {
  return ONESTEP_PICK(gated_residual_layernorm_modulate_bwd, dres, dout, res, y, gate, scale,
                      mean, rstd, dx, dy, dgate, dshift, dscale, B, N, D, mod_strides, per_token,
                      dtype, num_threads);
}

int bias_gelu_tanh_fwd(const void* x, const void* bias, void* y, int64_t R, int64_t F, int dtype,
                       int num_threads) {
  return ONESTEP_PICK(bias_gelu_tanh_fwd, x, bias, y, R, F, dtype, num_threads);
}

int bias_gelu_tanh_bwd(const void* dy, const void* x, const void* bias, void* dx, void* dbias,
                       int64_t R, int64_t F, int dtype, int num_threads) {
  return ONESTEP_PICK(bias_gelu_tanh_bwd, dy, x, bias, dx, dbias, R, F, dtype, num_threads);
}

int attention_fwd(const void* q, const void* k, const void* v, void* out, float* lse, int64_t B,
                  int64_t H, int64_t N, int64_t NK, int64_t D, const int64_t* strides,
                  float scale, int dtype, int num_threads) {
  return ONESTEP_PICK(attention_fwd, q, k, v, out, lse, B, H, N, NK, D, strides, scale, dtype,
                      num_threads);
}

int attention_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out,
                  const float* lse, void* dq, void* dk, void* dv, int64_t B, int64_t H, int64_t N,
                  int64_t NK, int64_t D, const int64_t* strides, float scale, int dtype,
                  int num_threads) {
  return ONESTEP_PICK(attention_bwd, dout, q, k, v, out, lse, dq, dk, dv, B, H, N, NK, D, strides,
                      scale, dtype, num_threads);
}

}  // namespace onestep::cpu
