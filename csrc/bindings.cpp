// pybind11 module onestep_kernels._C: the CPU launchers, each taking the bytes of its params
// struct (common/params.h, packed by onestep_kernels/native.py) and a thread count. No logic:
// validation lives in Python, the kernels in csrc/cpu.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
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
  m.def(#name, [](py::bytes packed, int num_threads) {                               \
    char* data = nullptr;                                                            \
    Py_ssize_t size = 0;                                                             \
    PyBytes_AsStringAndSize(packed.ptr(), &data, &size);                             \
    if (size != static_cast<Py_ssize_t>(sizeof(onestep::Params))) return int(onestep::kBadParams); \
    onestep::Params params;                                                          \
    std::memcpy(&params, data, sizeof(params));                                      \
    py::gil_scoped_release release;                                                  \
    return onestep::cpu::name(params, num_threads);                                  \
  });
  ONESTEP_LAUNCHERS(ONESTEP_BIND)
#undef ONESTEP_BIND
}
