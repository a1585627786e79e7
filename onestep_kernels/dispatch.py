"""Backend choice: ``triton``, ``cuda``, ``cpu`` or ``torch``.

Precedence: the ``backend=`` argument of a call, then the innermost ``use_backend(...)``
context, then the ``ONESTEP_BACKEND`` environment variable, then the default for the tensor's
device: ``cpu`` for CPU tensors (``torch`` if the native module is missing), ``triton`` for
CUDA tensors (then ``cuda``, then ``torch``). Triton runs CPU tensors only under
``TRITON_INTERPRET=1`` (slow; for testing), so it is never the default there.

Under ``torch.compile`` the backend is resolved once, when the graph is traced.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from . import native
from .triton_compat import HAS_TRITON

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "ONESTEP_BACKEND"

_local = threading.local()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_unavailable_reason() -> str | None:
    if not HAS_TRITON:
        return "triton is not installed"
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return None


def unavailable_reason(name: str) -> str | None:
    """None if backend `name` is usable on this machine, else why not."""
    if name == "triton":
        return _triton_unavailable_reason()
    if name == "cuda":
        return native.cuda_unavailable_reason()
    if name == "cpu":
        return native.CPU_IMPORT_ERROR
    return None


def available_backends() -> dict[str, str]:
    """Each backend mapped to "available" or to the reason it is not."""
    return {name: unavailable_reason(name) or "available" for name in BACKENDS}


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed onestep ops on backend ``name`` (thread-local, nestable)."""
    _check_name(name, "use_backend")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _supports(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run tensors on ``device``, else why not."""
    reason = unavailable_reason(name)
    if reason is not None:
        return reason
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got {device.type} tensors"
    if name == "triton" and device.type != "cuda" and not triton_interpret():
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1), got {device.type} tensors"
    return None


@torch.compiler.assume_constant_result
def _requested() -> str:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return os.environ.get(ENV_VAR, "")


def resolve(backend: str | None, device: torch.device, cannot: dict[str, str] | None = None) -> str:
    """The backend that runs an op on ``device``; raises ValueError if it cannot.

    ``cannot`` maps backends that cannot take this particular call (a size they do not
    handle, say) to the reason: asking for one is an error, the default skips it."""
    cannot = cannot or {}
    if backend is not None:
        source = "backend"
        name = backend
    else:
        name = _requested()
        source = f"use_backend/{ENV_VAR}"
    if name:
        _check_name(name, source)
        reason = cannot.get(name) or _supports(name, device)
        if reason is not None:
            raise ValueError(f"{source}: backend {name!r} cannot run here: {reason}")
        return name
    return default_backend(device, cannot)


def default_backend(device: torch.device, cannot: dict[str, str] | None = None) -> str:
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in order:
        if name not in (cannot or {}) and _supports(name, device) is None:
            return name
    return "torch"
