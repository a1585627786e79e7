"""Loads the compiled kernels and passes tensors to them as raw pointers.

- CPU: the pybind11 module ``onestep_kernels._C`` (built by ``pip install -e .``).
- CUDA: ``libonestep_cuda.so`` beside this file, loaded with ctypes on first use only, so that
  importing onestep_kernels never touches a GPU.

Launchers return a status code; a non-zero code becomes a RuntimeError here.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CUDA_LIBRARY_PATH = Path(__file__).with_name("libonestep_cuda.so")

try:
    from . import _C as cpu_module

    CPU_IMPORT_ERROR: str | None = None
except ImportError as error:  # not built: the cpu backend is unavailable, everything else works
    cpu_module = None
    CPU_IMPORT_ERROR = f"onestep_kernels._C not importable ({error}); run `pip install -e .`"


def dtype_code(tensor: torch.Tensor) -> int:
    return DTYPE_CODES[tensor.dtype]


def ptr(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def check_cpu_status(code: int, op: str) -> None:
    if code != 0:
        raise RuntimeError(f"onestep {op} (cpu) failed: {cpu_module.status_string(code)}")


@functools.cache
def cuda_library() -> ctypes.CDLL | None:
    """The CUDA kernels, or None when they were not built."""
    if not CUDA_LIBRARY_PATH.exists():
        return None
    lib = ctypes.CDLL(str(CUDA_LIBRARY_PATH))
    i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.onestep_cuda_status_string.restype = ctypes.c_char_p
    lib.onestep_cuda_status_string.argtypes = [i32]
    lib.onestep_cuda_last_error_string.restype = ctypes.c_char_p
    lib.onestep_cuda_layernorm_modulate_fwd.restype = i32
    lib.onestep_cuda_layernorm_modulate_fwd.argtypes = [vp] * 6 + [i64] * 9 + [i32, f32, vp]
    lib.onestep_cuda_layernorm_modulate_bwd.restype = i32
    lib.onestep_cuda_layernorm_modulate_bwd.argtypes = [vp] * 8 + [i64] * 7 + [i32, i32, vp]
    lib.onestep_cuda_gated_residual_layernorm_modulate_fwd.restype = i32
    lib.onestep_cuda_gated_residual_layernorm_modulate_fwd.argtypes = (
        [vp] * 9 + [i64] * 3 + [ctypes.POINTER(i64), i32, f32, vp])
    lib.onestep_cuda_bias_gelu_tanh_fwd.restype = i32
    lib.onestep_cuda_bias_gelu_tanh_fwd.argtypes = [vp] * 3 + [i64] * 2 + [i32, vp]
    return lib


def int64_array(values) -> ctypes.Array:
    """A C array of int64 for launchers that take a strides pointer."""
    return (ctypes.c_int64 * len(values))(*values)


@functools.cache  # neither the file nor the device count changes during a process
def cuda_unavailable_reason() -> str | None:
    if not CUDA_LIBRARY_PATH.exists():
        return "libonestep_cuda.so was not built (no nvcc at install time, or ONESTEP_SKIP_CUDA=1)"
    if not torch.cuda.is_available():
        return "built, but torch sees no CUDA device"
    return None


def check_cuda_status(code: int, op: str) -> None:
    if code != 0:
        lib = cuda_library()
        detail = lib.onestep_cuda_status_string(code).decode()
        if detail == "CUDA error":
            detail += ": " + lib.onestep_cuda_last_error_string().decode()
        raise RuntimeError(f"onestep {op} (cuda) failed: {detail}")


def cuda_stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream
