// Status codes returned by every native launcher (CPU and CUDA). Python turns a non-zero code
// into an exception carrying onestep_status_string(code).
#pragma once

namespace onestep {

enum Status : int {
  kOk = 0,
  kBadDtype = 1,      // dtype code not one of DType
  kBadSize = 2,       // a size or stride is negative or inconsistent
  kCudaError = 3,     // a CUDA runtime call or kernel launch failed
  kOutOfMemory = 4,   // a host workspace could not be allocated
  kBadParams = 5,     // a params buffer of the wrong size for its struct
};

// Dtype codes shared with onestep_kernels/native.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* status_string(int code) {
  switch (code) {
    case kOk: return "ok";
    case kBadDtype: return "unsupported dtype code";
    case kBadSize: return "invalid size or stride";
    case kCudaError: return "CUDA error";
    case kOutOfMemory: return "out of host memory";
    case kBadParams: return "params buffer of the wrong size";
    default: return "unknown status code";
  }
}

}  // namespace onestep
