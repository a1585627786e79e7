"""Backend choice. Each op declares its implementations once, as `Backend` records (what they
run on, which dtypes, which widths, their forward and backward launchers); one resolver reads
them, and so do the tests' backend matrix, `backend_choices()` and the README's op table.

Precedence for a call: the ``backend=`` argument, then the innermost ``use_backend(...)``
context, then the ``ONESTEP_BACKEND`` environment variable, then the default order for the
tensor's device: the user's own measurement (`onestep_kernels.preferences`) or the op's
`default_order` row (measured, declared with its records), then the op's records in
declaration order.
The first record on that list that can take the call runs it; a backend named explicitly that
cannot take it is an error naming its reason. A context or environment choice applies to the
ops that have a backend of that name and leaves the others on their default. ``torch`` is a
deprecated alias of each op's PyTorch implementation (``reference``, or ``sdpa`` for attention).

A resolution is cached per (op, request, device, dtype, width, gradient or not), so the hot
path does one dictionary look-up. Under ``torch.compile`` it happens once, at trace time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

from . import native, preferences
from .errors import ArgumentError
from .preferences import device_capability
from .torch_compat import environment_lookup
from .triton_compat import HAS_TRITON, interpreter_problem

ENV_VAR = "ONESTEP_BACKEND"
TORCH_ALIAS = "torch"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = FLOAT_DTYPES + (torch.float64,)
ANY_DEVICE = ("any",)  # the PyTorch expressions run wherever PyTorch does
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}

_local = threading.local()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _runtime_reason(runtime: str) -> str | None:
    """None if the software a backend needs is present on this machine, else why not."""
    if runtime == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if triton_interpret():
            return interpreter_problem()
        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
        return None
    if runtime == "cuda_library":
        return native.cuda_unavailable_reason()
    if runtime == "cpu_library":
        return native.CPU_IMPORT_ERROR
    return None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op, declared as data.

    runtime: what must be present ("triton", "cuda_library", "cpu_library", "torch").
    devices: tensor device types it takes (Triton also takes CPU tensors under
        TRITON_INTERPRET=1, except bfloat16, which the interpreter computes wrongly).
    expression: for PyTorch backends, the expression that computes the op (autograd
        differentiates it); kernels have launchers instead.
    forward/backward: the launchers. backward None with `backward_from` empty: forward only.
    backward_from: backends whose backward launcher runs this backend's backward, the first
        one available (for kernels that have no backward of their own).
    max_width: the largest last dimension (the row, or the head dim) it takes, and per dtype
        in `max_width_by_dtype`; `min_width` the smallest.
    call_limit: optional extra rule, f(width, dtype) -> reason or None.
    """

    name: str
    runtime: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    expression: Callable | None = None
    forward: Callable | None = None
    backward: Callable | None = None
    backward_from: tuple[str, ...] = ()
    min_width: int = 1
    max_width: int | None = None
    max_width_by_dtype: tuple[tuple[torch.dtype, int], ...] = ()
    min_capability: tuple[int, int] | None = None
    summary: str = ""
    # Runs a PyTorch expression (autograd gives the gradients). A field set from `expression`,
    # not a property: every op call asks (a property call costs ~0.07 us more).
    is_expression: bool = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "is_expression", self.expression is not None)

    @property
    def has_backward(self) -> bool:
        return self.is_expression or self.backward is not None or bool(self.backward_from)

    def reason(self, device: torch.device, dtype: torch.dtype, width: int, needs_grad: bool,
               width_name: str = "D") -> str | None:
        """None if this backend can take such a call, else why not."""
        reason = _runtime_reason(self.runtime)
        if reason is not None:
            return reason
        on_interpreter = self.runtime == "triton" and device.type == "cpu" and triton_interpret()
        anywhere = self.devices == ANY_DEVICE
        if device.type not in self.devices and not on_interpreter and not anywhere:
            return f"runs {'/'.join(self.devices)} tensors, got {device.type} tensors"
        if dtype not in self.dtypes:
            names = ", ".join(_DTYPE_NAMES[d] for d in self.dtypes)
            return f"takes {names}, got {_DTYPE_NAMES.get(dtype, dtype)}"
        if on_interpreter and dtype == torch.bfloat16:
            return "the Triton interpreter computes bfloat16 wrongly"
        limit = dict(self.max_width_by_dtype).get(dtype, self.max_width)
        if width < self.min_width or (limit is not None and width > limit):
            top = "" if limit is None else f"..{limit}"
            return (f"takes {width_name} in {self.min_width}{top} for {_DTYPE_NAMES[dtype]}, "
                    f"got {width_name}={width}")
        if needs_grad and not self.has_backward:
            return "forward only (no backward); gradients need another backend"
        if self.min_capability is not None and device.type == "cuda":
            if device_capability(device.index) < self.min_capability:
                return f"needs compute capability {self.min_capability}"
        return None


class Op:
    """An op's backends, declared once; resolves a call to one of them.

    default_order: per device class ("cpu", "sm_90", ...) the backends fastest first, as
        measured (onestep_kernels.preferences says where each row comes from); a GPU whose
        class has no row uses preferences.FALLBACK_GPU_CLASS's.
    """

    def __init__(self, name: str, backends: list[Backend], *, torch_alias: str = "reference",
                 width_name: str = "D", default_order: dict[str, tuple[str, ...]] | None = None):
        if name in OPS:
            raise ArgumentError(f"name: an op named {name!r} is already declared")
        self.name = name
        self.backends = {b.name: b for b in backends}
        self.torch_alias = torch_alias
        self.width_name = width_name
        self.default_order = dict(default_order or {})
        for row, order in self.default_order.items():
            unknown = [n for n in order if n not in self.backends]
            if unknown:
                raise ArgumentError(f"default_order: {name}'s row {row!r} names backends it "
                                    f"does not declare: {unknown}")
        self._cache: dict[tuple, Backend] = {}
        self._backward_cache: dict[tuple, Callable] = {}
        OPS[name] = self

    def __getitem__(self, name: str) -> Backend:
        return self.backends[name]

    def reason(self, name: str, device: torch.device, dtype: torch.dtype, width: int,
               needs_grad: bool) -> str | None:
        """None if backend `name` can take such a call, else why not: its record's own reason,
        and for a backend that borrows its backward, with gradients, that none of the backends
        it borrows from can take the call."""
        record = self.backends[name]
        reason = record.reason(device, dtype, width, needs_grad, self.width_name)
        if reason is None and needs_grad and record.backward is None and record.backward_from:
            reason = self._donor(record, device, dtype, width)[1]
        return reason

    def reasons(self, device: torch.device, dtype: torch.dtype, width: int,
                needs_grad: bool) -> dict[str, str | None]:
        """Every backend mapped to None (can run the call) or the reason it cannot."""
        return {name: self.reason(name, device, dtype, width, needs_grad)
                for name in self.backends}

    def resolve(self, backend: str | None, device: torch.device, dtype: torch.dtype, width: int,
                needs_grad: bool) -> Backend:
        """The backend that runs a call; ValueError if the one asked for cannot."""
        if torch.compiler.is_compiling():  # resolved once, outside the traced graph
            requested, source = (backend, "backend") if backend is not None else _requested()
            return self.backends[_resolve_name(self.name, requested, source, str(device), dtype,
                                               width, needs_grad)]
        if backend is None and not _open_contexts[0]:
            # The usual call, which asks for nothing itself: its key holds the environment
            # variable's raw value (decoded only when the key is new), so that the hot path
            # is one look-up in the environment and one here (~0.3 us less per op call).
            key = (_ENV_MAPPING.get(_ENV_KEY), device, dtype, width, needs_grad)
            found = self._cache.get(key)
            if found is None:
                found = self._cache[key] = self._cached(*_requested(), device, dtype, width,
                                                        needs_grad)
            return found
        requested, source = (backend, "backend") if backend is not None else _requested()
        return self._cached(requested, source, device, dtype, width, needs_grad)

    def _cached(self, requested, source, device, dtype, width, needs_grad) -> Backend:
        key = (requested, source, device, dtype, width, needs_grad)
        found = self._cache.get(key)
        if found is None:
            found = self._resolve(requested, source, device, dtype, width, needs_grad)
            self._cache[key] = found
        return found

    def _resolve(self, requested, source, device, dtype, width, needs_grad) -> Backend:
        if requested and source != "backend":
            _check_name(requested, source)
        if requested == TORCH_ALIAS:
            warnings.warn(f"{source}: the backend name 'torch' is deprecated; for {self.name} "
                          f"it means {self.torch_alias!r}", DeprecationWarning, stacklevel=4)
            requested = self.torch_alias
        if requested:
            chosen = self.backends.get(requested)
            if chosen is None and source == "backend":
                raise ArgumentError(f"backend: {self.name} has no backend {requested!r}; "
                                    f"expected one of {tuple(self.backends)}")
            if chosen is not None:
                reason = self.reason(requested, device, dtype, width, needs_grad)
                if reason is not None:
                    raise ArgumentError(f"{source}: backend {requested!r} cannot run "
                                        f"{self.name} here: {reason}")
                return chosen
        order = [n for n in self.order(device) if n in self.backends]
        order += [n for n in self.backends if n not in order]
        for name in order:
            if self.reason(name, device, dtype, width, needs_grad) is None:
                return self.backends[name]
        # Every op has a PyTorch expression that runs anywhere: reaching this is a bug.
        reasons = self.reasons(device, dtype, width, needs_grad)
        raise RuntimeError(f"{self.name}: no backend can run this call: "
                           + "; ".join(f"{n}: {r}" for n, r in reasons.items()))

    def order(self, device: torch.device) -> tuple[str, ...]:
        """This op's backends for `device`, fastest first: the user's own measurement
        (preferences), else the op's default_order row for the device's class."""
        measured = preferences.measured_order(self.name, device)
        if measured:
            return measured
        row = self.default_order.get(preferences.device_class(device))
        if row is None and device.type == "cuda":
            row = self.default_order.get(preferences.FALLBACK_GPU_CLASS)
        return row or ()

    def backward_launcher(self, backend: Backend, device: torch.device, dtype: torch.dtype,
                          width: int) -> Callable:
        """The launcher that computes `backend`'s backward of a call on `device` in `dtype` at
        `width`: its own, or that of the first backend in its `backward_from` that can take
        the same call (each donor is asked its full reason: a donor whose kernels stop at a
        width must not be handed a wider row)."""
        if backend.backward is not None:
            return backend.backward
        key = (backend.name, device, dtype, width)
        found = self._backward_cache.get(key)
        if found is None:
            donor, reason = self._donor(backend, device, dtype, width)
            if donor is None:
                raise RuntimeError(f"{self.name}: no backward for backend {backend.name!r} "
                                   f"here: {reason}")
            found = self._backward_cache[key] = donor.backward
        return found

    def _donor(self, backend: Backend, device: torch.device, dtype: torch.dtype,
               width: int) -> tuple[Backend | None, str | None]:
        """(the first backend in `backend.backward_from` whose backward can take the call,
        None), or (None, why none can)."""
        reasons = []
        for name in backend.backward_from:
            donor = self.backends[name]
            reason = donor.reason(device, dtype, width, True, self.width_name)
            if reason is None and donor.backward is not None:
                return donor, None
            reasons.append(f"{name}: {reason or 'has no backward launcher'}")
        return None, "no backend it borrows a backward from can take it (" + "; ".join(
            reasons) + ")"

    def backward_name(self, backend: Backend) -> str:
        """Which backward runs for `backend`, in words (for reports)."""
        if backend.is_expression:
            return "autograd of the expression"
        if backend.backward is not None:
            return "own kernel"
        if backend.backward_from:
            return "first available of " + ", ".join(backend.backward_from)
        return "none (forward only)"


# Every op, by name; filled as the op modules are imported.
OPS: dict[str, Op] = {}


@torch.compiler.assume_constant_result
def _resolve_name(op: str, requested: str, source: str, device: str, dtype: torch.dtype,
                  width: int, needs_grad: bool) -> str:
    return OPS[op]._resolve(requested, source, torch.device(device), dtype, width,
                            needs_grad).name


def backend_names() -> tuple[str, ...]:
    """Every backend name some op declares, plus the deprecated alias."""
    names = dict.fromkeys(n for op in OPS.values() for n in op.backends)
    return (*sorted(names), TORCH_ALIAS)


def clear_cache() -> None:
    """Forget cached resolutions (after changing what is installed, in tests)."""
    _runtime_reason.cache_clear()
    preferences.forget_measurements()
    for op in OPS.values():
        op._cache.clear()
        op._backward_cache.clear()


def _check_name(name: str, source: str) -> str:
    if name not in backend_names():
        raise ArgumentError(f"{source}: unknown backend {name!r}; expected one of "
                            f"{backend_names()}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed onestep ops on backend ``name`` where an op has it (thread-local,
    nestable); ops without a backend of that name keep their default."""
    _check_name(name, "use_backend")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    _open_contexts[0] += 1
    try:
        yield
    finally:
        _open_contexts[0] -= 1
        stack.pop()


_open_contexts = [0]  # use_backend contexts open in any thread: none, no thread-local look-up


@torch.compiler.assume_constant_result
def _requested() -> tuple[str, str]:
    if _open_contexts[0]:
        stack = getattr(_local, "stack", None)
        if stack:
            return stack[-1], "use_backend"
    return _environment_backend(), ENV_VAR


# ONESTEP_BACKEND as stored, read with one dict look-up on the hot path (torch_compat says why)
_ENV_MAPPING, _ENV_KEY, _decode_environment = environment_lookup(ENV_VAR)


def _environment_backend() -> str:
    return _decode_environment(_ENV_MAPPING.get(_ENV_KEY)) or ""


def available_backends() -> dict[str, str]:
    """Each backend name mapped to "available" or to the reason this machine cannot run it."""
    report = {}
    for op in OPS.values():
        for name, b in op.backends.items():
            report.setdefault(name, _runtime_reason(b.runtime) or "available")
    return report


def backend_choices(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    width: int = 1152, head_dim: int = 72,
                    needs_grad: bool = False) -> dict[str, dict]:
    """What each op runs on `device` for a call of `dtype` with rows of `width` (attention:
    `head_dim`), and why each other backend is not chosen."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    report = {}
    for op in OPS.values():
        w = head_dim if op.width_name == "head dim" else width
        chosen = op.resolve(None, device, dtype, w, needs_grad)
        report[op.name] = {"chosen": chosen.name,
                           "backends": {n: r or "can run" for n, r in
                                        op.reasons(device, dtype, w, needs_grad).items()}}
    return report
