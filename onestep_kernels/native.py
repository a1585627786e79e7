"""Loads the compiled kernels and passes each launcher its params struct.

- CPU: the pybind11 module ``onestep_kernels._C`` (built by ``pip install -e .``).
- CUDA: ``libonestep_cuda.so`` beside this file, loaded with ctypes on first use only, so that
  importing onestep_kernels never touches a GPU.

Every launcher takes one struct of named fields (csrc/common/params.h). Its bytes are packed
here (`struct.Struct`, the cheapest way Python has to build them) from the layout the compiled
library reports (names, offsets, types, sizes), checked field by field against a ctypes mirror
of the same layout when first used; a struct is filled by field name, and a missing or unknown
field is an error. Launchers return a status code; a non-zero code becomes a RuntimeError here.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Callable
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


# ---- params structs -------------------------------------------------------------------------


_FIELD_TYPES = {"int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "float": ctypes.c_float}
_PACK_CODES = {"int64_t": "q", "int32_t": "i", "float": "f"}  # pointers: "Q"


def params_from_layout(text: str) -> dict[str, Callable]:
    """Keyword constructors of the structs a library describes ("Name size|field:offset:type|
    ...;"): each returns the struct's bytes, packed at the library's offsets, which a ctypes
    mirror of the struct (`.struct`) confirms field by field, with the size."""
    structs = {}
    for entry in filter(None, text.split(";")):
        head, *fields = entry.split("|")
        name, size = head.split()
        parsed = [field.split(":", 2) for field in fields]
        members = [(f, ctypes.c_void_p if t.endswith("*") else _FIELD_TYPES[t])
                   for f, _, t in parsed]
        cls = type(name, (ctypes.Structure,), {"_fields_": members})
        for field, offset, _ in parsed:
            if getattr(cls, field).offset != int(offset):
                raise RuntimeError(f"{name}.{field}: at offset {offset} in the library, "
                                   f"{getattr(cls, field).offset} in ctypes")
        if ctypes.sizeof(cls) != int(size):
            raise RuntimeError(f"{name}: {size} bytes in the library, {ctypes.sizeof(cls)} "
                               "in ctypes")
        structs[name] = _keyword_packer(cls, _pack_format(name, parsed, int(size)))
    return structs


def _pack_format(name: str, parsed: list, size: int) -> struct.Struct:
    """A struct.Struct that writes each field at its offset (explicit padding, standard sizes)."""
    fmt, position = "=", 0
    for _field, offset, kind in parsed:
        code = "Q" if kind.endswith("*") else _PACK_CODES[kind]
        fmt += "x" * (int(offset) - position) + code
        position = int(offset) + struct.calcsize("=" + code)
    packer = struct.Struct(fmt + "x" * (size - position))
    if packer.size != size:
        raise RuntimeError(f"{name}: packs to {packer.size} bytes, expected {size}")
    return packer


def _keyword_packer(cls: type, packer: struct.Struct) -> Callable:
    """The struct's constructor with every field a required keyword argument (a missing or
    misspelt field is a TypeError naming it, never a silent zero), returning its bytes."""
    names = ", ".join(name for name, _ in cls._fields_)
    namespace = {"pack": packer.pack}
    exec(f"def {cls.__name__}(*, {names}):\n    return pack({names})", namespace)  # noqa: S102
    make = namespace[cls.__name__]
    make.struct = cls
    make.pack = packer.pack
    return make


def _cuda_layout(lib: ctypes.CDLL) -> str:
    size = lib.onestep_cuda_params_layout(None, 0)
    buf = ctypes.create_string_buffer(size + 1)
    lib.onestep_cuda_params_layout(buf, size + 1)
    return buf.value.decode()


@functools.cache
def params_types() -> dict[str, Callable]:
    """The params mirrors' keyword constructors, from whichever library is built (both
    describe one header)."""
    if cpu_module is not None:
        return params_from_layout(cpu_module.params_layout())
    lib = cuda_library()
    if lib is None:
        raise RuntimeError("no native library is built: run `pip install -e .`")
    return params_from_layout(_cuda_layout(lib))


@functools.cache
def params_type(name: str) -> Callable:
    """The keyword constructor of params struct `name`; its ctypes class is `.struct`."""
    return params_types()[name]


@functools.cache
def positional_params(name: str, fields: str) -> Callable:
    """Params struct `name`'s constructor by position, for launchers called at every op call:
    `fields` lists the struct's fields in its own order (space-separated), next to the call's
    values, and is checked against the layout once. A keyword call of twenty fields costs
    ~1.3 us more (dev VM), about a tenth of an op's host time."""
    make = params_type(name)
    expected = " ".join(field for field, _ in make.struct._fields_)
    if fields.split() != expected.split():
        raise ValueError(f"fields: {name} has fields {expected!r}, got {fields!r}")
    return make.pack


# ---- running launchers ------------------------------------------------------------------------


def run_cpu(launcher: str, params: bytes) -> None:
    code = getattr(cpu_module, launcher)(params, torch.get_num_threads())
    if code != 0:
        raise RuntimeError(f"onestep {launcher} (cpu) failed: {cpu_module.status_string(code)}")


def run_cuda(launcher: str, params: bytes, tensor: torch.Tensor) -> None:
    lib = cuda_library()
    code = _cuda_function(launcher)(params, cuda_stream(tensor))
    if code != 0:
        detail = lib.onestep_cuda_status_string(code).decode()
        if detail == "CUDA error":
            detail += ": " + lib.onestep_cuda_last_error_string().decode()
        raise RuntimeError(f"onestep {launcher} (cuda) failed: {detail}")


@functools.cache
def cuda_library() -> ctypes.CDLL | None:
    """The CUDA kernels, or None when they were not built. Its params layout must be the CPU
    module's (the same header): a stale build is refused here."""
    if not CUDA_LIBRARY_PATH.exists():
        return None
    lib = ctypes.CDLL(str(CUDA_LIBRARY_PATH))
    lib.onestep_cuda_status_string.restype = ctypes.c_char_p
    lib.onestep_cuda_status_string.argtypes = [ctypes.c_int]
    lib.onestep_cuda_last_error_string.restype = ctypes.c_char_p
    lib.onestep_cuda_params_layout.restype = ctypes.c_int
    lib.onestep_cuda_params_layout.argtypes = [ctypes.c_char_p, ctypes.c_int]
    if cpu_module is not None and _cuda_layout(lib) != cpu_module.params_layout():
        raise RuntimeError(f"{CUDA_LIBRARY_PATH} was built from another csrc/common/params.h "
                           "than onestep_kernels._C: rebuild with `pip install -e .`")
    return lib


@functools.cache
def _cuda_function(launcher: str):
    """The CUDA library's `onestep_cuda_<launcher>(const Params*, stream)`."""
    fn = getattr(cuda_library(), "onestep_cuda_" + launcher)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return fn


@functools.cache  # neither the file nor the device count changes during a process
def cuda_unavailable_reason() -> str | None:
    if not CUDA_LIBRARY_PATH.exists():
        return "libonestep_cuda.so was not built (no nvcc at install time, or ONESTEP_SKIP_CUDA=1)"
    if not torch.cuda.is_available():
        return "built, but torch sees no CUDA device"
    return None


# The widest row the CUDA LayerNorm kernels take: 256 threads of 32 elements where a row does
# not allow 16-byte vectors (csrc/cuda/rows.cuh); wider rows go to another backend.
CUDA_MAX_WIDTH = 8192
# Rows per block of the CUDA LayerNorm backwards (csrc/cuda/*.cu's kBwdRows): the grain of
# their per-sample partial sums.
CUDA_BWD_ROWS = 16


def cuda_partials(x: torch.Tensor, planes: int, per_token: bool) -> torch.Tensor | None:
    """The fp32 workspace of a CUDA LayerNorm backward's per-sample partial sums, (planes, B,
    ceil(N / CUDA_BWD_ROWS), D); None where the modulation is per token (none is needed)."""
    if per_token:
        return None
    B, N, D = x.shape
    return x.new_empty((planes, B, -(-N // CUDA_BWD_ROWS), D), dtype=torch.float32)


def address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def cuda_stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream
