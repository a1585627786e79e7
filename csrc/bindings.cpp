// pybind11 module onestep_kernels._C: the CPU launchers, each taking the address of its params
// struct (common/params.h, filled by onestep_kernels/native.py) and a thread count. No logic:
// validation lives in Python, the kernels in csrc/cpu.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/params.h"
#include "common/status.h"
#include "cpu/kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "onestep CPU kernels (params-struct launchers; use onestep_kernels, not this module)";
  m.def("active_isa", &onestep::cpu::active_isa);
  m.def("has_avx2_build", &onestep::cpu::has_avx2_build);
  m.def("status_string", [](int code) { return onestep::status_string(code); });
  m.def("params_layout", [] {
    std::string text(static_cast<size_t>(onestep::describe_params(nullptr, 0)) + 1, '\0');
    text.resize(static_cast<size_t>(onestep::describe_params(text.data(),
                                                             static_cast<int>(text.size()))));
    return text;
  });

#define ONESTEP_BIND(name, Params)                                                   \
  m.def(#name, [](uintptr_t params, int num_threads) {                               \
    py::gil_scoped_release release;                                                  \
    return onestep::cpu::name(*reinterpret_cast<const onestep::Params*>(params), num_threads); \
  });
  ONESTEP_LAUNCHERS(ONESTEP_BIND)
#undef ONESTEP_BIND
}
