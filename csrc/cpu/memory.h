// First-touch help for large fresh outputs on Linux.
//
// A fresh tensor of tens of MB is a new mmap (glibc's threshold is at most 32 MB), and writing
// it takes one page fault per 4 KB page: on the development VMs that alone cost ~10 ms for a
// (32, 256, 1152) fp32 output, several times the kernel's own time. Advising transparent huge
// pages on the 2 MB-aligned interior before the first write makes that ~18 faults. Pages that
// were already touched are unaffected, so reused buffers lose nothing. Disable with
// ONESTEP_CPU_HUGEPAGES=0.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace onestep::cpu {
namespace {  // internal linkage: included by per-ISA objects (see row.h)

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("ONESTEP_CPU_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < static_cast<int64_t>(4 * kHuge) || !huge_pages_enabled()) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advisory: errors ignored
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace
}  // namespace onestep::cpu
