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
#define ONESTEP_CPU_PICK(name, Params)                                  \
  int name(const Params& p, int num_threads) {                          \
    return choose_avx2() ? avx2::name(p, num_threads) : base::name(p, num_threads); \
  }
#else
#define ONESTEP_CPU_PICK(name, Params) \
  int name(const Params& p, int num_threads) { return base::name(p, num_threads); }
#endif
ONESTEP_LAUNCHERS(ONESTEP_CPU_PICK)

}  // namespace onestep::cpu
