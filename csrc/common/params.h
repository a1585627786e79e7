// The arguments of every native launcher, one struct per launcher, shared by the CPU and CUDA
// code and by Python: each struct is declared once here as a field list, the libraries
// describe their layout (`describe_params`), and onestep_kernels/native.py builds its
// ctypes mirrors from that description and checks them. Python fills a struct by field
// name and passes its address; a launcher reads named fields, so no argument can land in
// the wrong position.
//
// Conventions: pointers are raw device or host pointers, sizes and strides are in elements,
// strides are those of the (B, N) or (B, H, N) dimensions (the last dimension is contiguous;
// a stride of 0 broadcasts, which is how per-sample modulation is expressed), outputs are
// contiguous, `dtype` is a DType code. Launchers return a Status. `partials`: an fp32
// workspace of the CUDA backwards for per-block partial sums of per-sample gradients, with
// room for planes x B x ceil(N / 16) x D floats (the LayerNorm ops: 2 and 3 planes; null when
// per-token) or ceil(R / 32) x F (bias+GELU); the CPU launchers take null and ignore it.
//
// Adding a launcher: its field list and one line in ONESTEP_LAUNCHERS below; the CPU entry
// point, its pybind binding and the run-time ISA choice are generated from that line.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "status.h"

namespace onestep {

#define ONESTEP_LAYERNORM_MODULATE_FWD_FIELDS(X)                                           \
  X(const void*, x) X(const void*, shift) X(const void*, scale) X(void*, out)             \
  X(float*, mean) X(float*, rstd) X(int64_t, B) X(int64_t, N) X(int64_t, D)               \
  X(int64_t, x_sb) X(int64_t, x_sn) X(int64_t, shift_sb) X(int64_t, shift_sn)             \
  X(int64_t, scale_sb) X(int64_t, scale_sn) X(float, eps) X(int32_t, dtype)

#define ONESTEP_LAYERNORM_MODULATE_BWD_FIELDS(X)                                           \
  X(const void*, dy) X(const void*, x) X(const void*, scale) X(const float*, mean)        \
  X(const float*, rstd) X(void*, dx) X(void*, dshift) X(void*, dscale) X(int64_t, B)      \
  X(int64_t, N) X(int64_t, D) X(int64_t, x_sb) X(int64_t, x_sn) X(int64_t, scale_sb)      \
  X(int64_t, scale_sn) X(float*, partials) X(int32_t, per_token) X(int32_t, dtype)

#define ONESTEP_GATED_RESIDUAL_FWD_FIELDS(X)                                               \
  X(const void*, x) X(const void*, y) X(const void*, gate) X(const void*, shift)          \
  X(const void*, scale) X(void*, res) X(void*, out) X(float*, mean) X(float*, rstd)       \
  X(int64_t, B) X(int64_t, N) X(int64_t, D) X(int64_t, gate_sb) X(int64_t, gate_sn)       \
  X(int64_t, shift_sb) X(int64_t, shift_sn) X(int64_t, scale_sb) X(int64_t, scale_sn)     \
  X(float, eps) X(int32_t, dtype)

#define ONESTEP_GATED_RESIDUAL_BWD_FIELDS(X)                                               \
  X(const void*, dres) X(const void*, dout) X(const void*, x) X(const void*, y)           \
  X(const void*, gate) X(const void*, scale) X(const float*, mean) X(const float*, rstd)  \
  X(void*, dx) X(void*, dy) X(void*, dgate) X(void*, dshift) X(void*, dscale)             \
  X(int64_t, B) X(int64_t, N) X(int64_t, D) X(int64_t, gate_sb) X(int64_t, gate_sn)       \
  X(int64_t, scale_sb) X(int64_t, scale_sn) X(float*, partials) X(int32_t, per_token)     \
  X(int32_t, dtype)

#define ONESTEP_BIAS_GELU_TANH_FWD_FIELDS(X)                                               \
  X(const void*, x) X(const void*, bias) X(void*, y) X(int64_t, R) X(int64_t, F)          \
  X(int32_t, dtype)

#define ONESTEP_BIAS_GELU_TANH_BWD_FIELDS(X)                                               \
  X(const void*, dy) X(const void*, x) X(const void*, bias) X(void*, dx) X(void*, dbias)  \
  X(float*, partials) X(int64_t, R) X(int64_t, F) X(int32_t, dtype)

// q, k, v, out (and dout) are (B, H, N or NK, D) with their own (B, H, N) strides.
#define ONESTEP_ATTENTION_FWD_FIELDS(X)                                                    \
  X(const void*, q) X(const void*, k) X(const void*, v) X(void*, out) X(float*, lse)      \
  X(int64_t, B) X(int64_t, H) X(int64_t, N) X(int64_t, NK) X(int64_t, D)                  \
  X(int64_t, q_sb) X(int64_t, q_sh) X(int64_t, q_sn) X(int64_t, k_sb) X(int64_t, k_sh)    \
  X(int64_t, k_sn) X(int64_t, v_sb) X(int64_t, v_sh) X(int64_t, v_sn) X(int64_t, out_sb)  \
  X(int64_t, out_sh) X(int64_t, out_sn) X(float, scale) X(int32_t, dtype)

#define ONESTEP_ATTENTION_BWD_FIELDS(X)                                                    \
  X(const void*, dout) X(const void*, q) X(const void*, k) X(const void*, v)              \
  X(const void*, out) X(const float*, lse) X(void*, dq) X(void*, dk) X(void*, dv)         \
  X(int64_t, B) X(int64_t, H) X(int64_t, N) X(int64_t, NK) X(int64_t, D)                  \
  X(int64_t, q_sb) X(int64_t, q_sh) X(int64_t, q_sn) X(int64_t, k_sb) X(int64_t, k_sh)    \
  X(int64_t, k_sn) X(int64_t, v_sb) X(int64_t, v_sh) X(int64_t, v_sn) X(int64_t, out_sb)  \
  X(int64_t, out_sh) X(int64_t, out_sn) X(int64_t, dout_sb) X(int64_t, dout_sh)           \
  X(int64_t, dout_sn) X(float, scale) X(int32_t, dtype)

// Noise screening's scoring: features and other are (M, T, D) and (M, T_other, D) with
// their own (M, T) strides; weight (C, D) and bias (C) fp32 (the class head, C > 0) or null
// (the cosine of the pooled features and other); target (M / n) int64; scores (M) fp32 and
// best (M / n, k) int64 are written.
#define ONESTEP_SCORE_CANDIDATES_FIELDS(X)                                                 \
  X(const void*, features) X(const void*, other) X(const float*, weight)                  \
  X(const float*, bias) X(const int64_t*, target) X(float*, scores) X(int64_t*, best)      \
  X(int64_t, M) X(int64_t, T) X(int64_t, T_other) X(int64_t, D) X(int64_t, C) X(int64_t, n) \
  X(int64_t, k) X(int64_t, f_sm) X(int64_t, f_st) X(int64_t, o_sm) X(int64_t, o_st)       \
  X(int32_t, dtype)

// Every params struct: X(StructName, FIELDS).
#define ONESTEP_PARAMS(X)                                                                  \
  X(LayerNormModulateFwdParams, ONESTEP_LAYERNORM_MODULATE_FWD_FIELDS)                    \
  X(LayerNormModulateBwdParams, ONESTEP_LAYERNORM_MODULATE_BWD_FIELDS)                    \
  X(GatedResidualFwdParams, ONESTEP_GATED_RESIDUAL_FWD_FIELDS)                            \
  X(GatedResidualBwdParams, ONESTEP_GATED_RESIDUAL_BWD_FIELDS)                            \
  X(BiasGeluTanhFwdParams, ONESTEP_BIAS_GELU_TANH_FWD_FIELDS)                             \
  X(BiasGeluTanhBwdParams, ONESTEP_BIAS_GELU_TANH_BWD_FIELDS)                             \
  X(AttentionFwdParams, ONESTEP_ATTENTION_FWD_FIELDS)                                     \
  X(AttentionBwdParams, ONESTEP_ATTENTION_BWD_FIELDS)                                     \
  X(ScoreCandidatesParams, ONESTEP_SCORE_CANDIDATES_FIELDS)

// Every CPU launcher: X(function name, params struct). Each takes (const Params&, threads).
#define ONESTEP_LAUNCHERS(X)                                                               \
  X(layernorm_modulate_fwd, LayerNormModulateFwdParams)                                   \
  X(layernorm_modulate_bwd, LayerNormModulateBwdParams)                                   \
  X(gated_residual_layernorm_modulate_fwd, GatedResidualFwdParams)                        \
  X(gated_residual_layernorm_modulate_bwd, GatedResidualBwdParams)                        \
  X(bias_gelu_tanh_fwd, BiasGeluTanhFwdParams)                                            \
  X(bias_gelu_tanh_bwd, BiasGeluTanhBwdParams)                                            \
  X(attention_fwd, AttentionFwdParams)                                                    \
  X(attention_bwd, AttentionBwdParams)                                                    \
  X(score_candidates, ScoreCandidatesParams)

#define ONESTEP_PARAMS_FIELD(type, name) type name;
#define ONESTEP_PARAMS_STRUCT(Name, FIELDS) \
  struct Name {                             \
    FIELDS(ONESTEP_PARAMS_FIELD)            \
  };
ONESTEP_PARAMS(ONESTEP_PARAMS_STRUCT)
#undef ONESTEP_PARAMS_STRUCT
#undef ONESTEP_PARAMS_FIELD

// Writes "Name sizeof|field:offset:type|...;" for every struct into buf (at most cap bytes,
// NUL-terminated) and returns the length it needed.
inline int describe_params(char* buf, int cap) {
  int n = 0;
#define ONESTEP_PUT(...) \
  n += std::snprintf(n < cap ? buf + n : nullptr, n < cap ? static_cast<size_t>(cap - n) : 0, __VA_ARGS__)
#define ONESTEP_DESCRIBE_FIELD(type, name) ONESTEP_PUT("|%s:%zu:%s", #name, offsetof(S, name), #type);
#define ONESTEP_DESCRIBE_STRUCT(Name, FIELDS) \
  {                                           \
    using S = Name;                           \
    ONESTEP_PUT("%s %zu", #Name, sizeof(S));  \
    FIELDS(ONESTEP_DESCRIBE_FIELD)            \
    ONESTEP_PUT(";");                         \
  }
  ONESTEP_PARAMS(ONESTEP_DESCRIBE_STRUCT)
#undef ONESTEP_DESCRIBE_STRUCT
#undef ONESTEP_DESCRIBE_FIELD
#undef ONESTEP_PUT
  return n;
}

// Runs `...` (which must return) with T bound to the storage type of dtype code `code`:
// float, HALF or BF16 (each side names its own 16-bit types); unknown codes return
// kBadDtype. The one dtype switch of every launcher.
#define ONESTEP_DTYPE_SWITCH(code, T, HALF, BF16, ...)  \
  switch (code) {                                       \
    case ::onestep::kFloat32: {                         \
      using T = float;                                  \
      __VA_ARGS__;                                      \
    }                                                   \
    case ::onestep::kFloat16: {                         \
      using T = HALF;                                   \
      __VA_ARGS__;                                      \
    }                                                   \
    case ::onestep::kBFloat16: {                        \
      using T = BF16;                                   \
      __VA_ARGS__;                                      \
    }                                                   \
    default:                                            \
      return ::onestep::kBadDtype;                      \
  }

}  // namespace onestep
