// Declarations of the CPU launchers, one per line of ONESTEP_LAUNCHERS (common/params.h):
// `int name(const Params& p, int num_threads)` returning an onestep::Status. Each kernel file
// is compiled once per instruction set (namespace `base`, portable; namespace `avx2`, -mavx2
// -mfma -mf16c on x86-64) and the un-namespaced entry points in dispatch.cpp pick one at run
// time.
#pragma once

#include <cstdint>

#include "../common/params.h"

#define ONESTEP_CPU_DECLARE(name, Params) int name(const ::onestep::Params& p, int num_threads);

namespace onestep::cpu {
namespace base {
ONESTEP_LAUNCHERS(ONESTEP_CPU_DECLARE)
}
namespace avx2 {
ONESTEP_LAUNCHERS(ONESTEP_CPU_DECLARE)
}
// Run-time choice between the two; see dispatch.cpp.
ONESTEP_LAUNCHERS(ONESTEP_CPU_DECLARE)
// "avx2" or "base": the instruction set the entry points above use in this process.
const char* active_isa();
// Whether this build contains the avx2 variant.
bool has_avx2_build();
}  // namespace onestep::cpu
