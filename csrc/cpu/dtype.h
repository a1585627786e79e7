// Storage types of the CPU kernels and their conversions to and from float.
// fp16 uses the compiler's _Float16 (IEEE, round-to-nearest-even; F16C instructions when the
// translation unit is built for AVX2). bf16 is a 16-bit pattern, rounded to nearest even.
#pragma once

#include <cstdint>
#include <cstring>

namespace onestep::cpu {
namespace {

using half_t = _Float16;

struct bfloat16_t {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(half_t v) { return static_cast<float>(v); }
inline float to_float(bfloat16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float v);

template <>
inline float from_float<float>(float v) { return v; }
template <>
inline half_t from_float<half_t>(float v) { return static_cast<half_t>(v); }
template <>
inline bfloat16_t from_float<bfloat16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16_t{static_cast<uint16_t>(u >> 16)};
}

}  // namespace
}  // namespace onestep::cpu

// The dtype switch of the CPU launchers (common/params.h), with the CPU's 16-bit types.
#define ONESTEP_CPU_DTYPE_SWITCH(code, T, ...) \
  ONESTEP_DTYPE_SWITCH(code, T, half_t, bfloat16_t, __VA_ARGS__)
