// pybind11 module onestep_kernels._C: the CPU launchers with pointers as integers. No logic:
// validation lives in Python (onestep_kernels/native.py), the kernels in csrc/cpu.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "common/status.h"
#include "cpu/kernels.h"

namespace py = pybind11;
using onestep::cpu::gated_residual_layernorm_modulate_bwd;
using onestep::cpu::gated_residual_layernorm_modulate_fwd;
using onestep::cpu::layernorm_modulate_bwd;
using onestep::cpu::layernorm_modulate_fwd;
using Strides6 = std::array<int64_t, 6>;
using Strides12 = std::array<int64_t, 12>;
using Strides15 = std::array<int64_t, 15>;

template <typename T>
static T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "onestep CPU kernels (raw-pointer launchers; use onestep_kernels, not this module)";
  m.def("active_isa", &onestep::cpu::active_isa);
  m.def("has_avx2_build", &onestep::cpu::has_avx2_build);
  m.def("status_string", [](int code) { return onestep::status_string(code); });

  m.def("layernorm_modulate_fwd",
        [](uintptr_t x, uintptr_t shift, uintptr_t scale, uintptr_t out, uintptr_t mean,
           uintptr_t rstd, int64_t B, int64_t N, int64_t D, int64_t x_sb, int64_t x_sn,
           int64_t shift_sb, int64_t shift_sn, int64_t scale_sb, int64_t scale_sn, int dtype,
           float eps, int num_threads) {
          py::gil_scoped_release release;
          return layernorm_modulate_fwd(ptr<const void>(x), ptr<const void>(shift),
                                        ptr<const void>(scale), ptr<void>(out), ptr<float>(mean),
                                        ptr<float>(rstd), B, N, D, x_sb, x_sn, shift_sb,
                                        shift_sn, scale_sb, scale_sn, dtype, eps, num_threads);
        });

  m.def("layernorm_modulate_bwd",
        [](uintptr_t dy, uintptr_t x, uintptr_t scale, uintptr_t mean, uintptr_t rstd,
           uintptr_t dx, uintptr_t dshift, uintptr_t dscale, int64_t B, int64_t N, int64_t D,
           int64_t x_sb, int64_t x_sn, int64_t scale_sb, int64_t scale_sn, int per_token,
           int dtype, int num_threads) {
          py::gil_scoped_release release;
          return layernorm_modulate_bwd(ptr<const void>(dy), ptr<const void>(x),
                                        ptr<const void>(scale), ptr<const float>(mean),
                                        ptr<const float>(rstd), ptr<void>(dx), ptr<void>(dshift),
                                        ptr<void>(dscale), B, N, D, x_sb, x_sn, scale_sb,
                                        scale_sn, per_token, dtype, num_threads);
        });

  m.def("gated_residual_layernorm_modulate_fwd",
        [](uintptr_t x, uintptr_t y, uintptr_t gate, uintptr_t shift, uintptr_t scale,
           uintptr_t res, uintptr_t out, uintptr_t mean, uintptr_t rstd, int64_t B, int64_t N,
           int64_t D, Strides6 mod_strides, int dtype, float eps, int num_threads) {
          py::gil_scoped_release release;
          return gated_residual_layernorm_modulate_fwd(
              ptr<const void>(x), ptr<const void>(y), ptr<const void>(gate),
              ptr<const void>(shift), ptr<const void>(scale), ptr<void>(res), ptr<void>(out),
              ptr<float>(mean), ptr<float>(rstd), B, N, D, mod_strides.data(), dtype, eps,
              num_threads);
        });

  m.def("gated_residual_layernorm_modulate_bwd",
        [](uintptr_t dres, uintptr_t dout, uintptr_t res, uintptr_t y, uintptr_t gate,
           uintptr_t scale, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dy,
           uintptr_t dgate, uintptr_t dshift, uintptr_t dscale, int64_t B, int64_t N, int64_t D,
           Strides6 mod_strides, int per_token, int dtype, int num_threads) {
          py::gil_scoped_release release;
          return gated_residual_layernorm_modulate_bwd(
              ptr<const void>(dres), ptr<const void>(dout), ptr<const void>(res),
              ptr<const void>(y), ptr<const void>(gate), ptr<const void>(scale),
              ptr<const float>(mean), ptr<const float>(rstd), ptr<void>(dx), ptr<void>(dy),
              ptr<void>(dgate), ptr<void>(dshift), ptr<void>(dscale), B, N, D,
              mod_strides.data(), per_token, dtype, num_threads);
        });

  m.def("bias_gelu_tanh_fwd", [](uintptr_t x, uintptr_t bias, uintptr_t y, int64_t R, int64_t F,
                                 int dtype, int num_threads) {
    py::gil_scoped_release release;
    return onestep::cpu::bias_gelu_tanh_fwd(ptr<const void>(x), ptr<const void>(bias),
                                            ptr<void>(y), R, F, dtype, num_threads);
  });

  m.def("bias_gelu_tanh_bwd", [](uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dx,
                                 uintptr_t dbias, int64_t R, int64_t F, int dtype,
                                 int num_threads) {
    py::gil_scoped_release release;
    return onestep::cpu::bias_gelu_tanh_bwd(ptr<const void>(dy), ptr<const void>(x),
                                            ptr<const void>(bias), ptr<void>(dx),
                                            ptr<void>(dbias), R, F, dtype, num_threads);
  });

  m.def("attention_fwd", [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                            int64_t B, int64_t H, int64_t N, int64_t NK, int64_t D,
                            Strides12 strides, float scale, int dtype, int num_threads) {
    py::gil_scoped_release release;
    return onestep::cpu::attention_fwd(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
                                       ptr<void>(out), ptr<float>(lse), B, H, N, NK, D,
                                       strides.data(), scale, dtype, num_threads);
  });

  m.def("attention_bwd", [](uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                            uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, int64_t B,
                            int64_t H, int64_t N, int64_t NK, int64_t D, Strides15 strides,
                            float scale, int dtype, int num_threads) {
    py::gil_scoped_release release;
    return onestep::cpu::attention_bwd(
        ptr<const void>(dout), ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
        ptr<const void>(out), ptr<const float>(lse), ptr<void>(dq), ptr<void>(dk), ptr<void>(dv),
        B, H, N, NK, D, strides.data(), scale, dtype, num_threads);
  });
}
