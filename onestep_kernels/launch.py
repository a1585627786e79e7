"""Eager launches of Triton kernels with little host time.

`kernel[grid](*args, **kwargs)` spends ~30 µs of Python per call on an H100 machine's host
before the launch itself (Triton's argument binding and specialisation, its cache key, the
launch metadata, and for an autotuned kernel the autotuner's key and lookup; measured with
`benchmarks/host_overhead_ratio.py --device cuda --profile`, 2026-11-25). A memory-bound op
on DiT-sized rows runs for less than that on the GPU, so the host time is the op's time.

`launcher(kernel)[grid](*args, **kwargs)` does what `kernel[grid](...)` does, through a cache:
the first call with a given signature goes through Triton itself (which compiles and, for an
autotuner, tunes) and keeps the compiled kernel it launched; later calls with the same
signature launch that compiled kernel directly. The signature is everything Triton
specialises a compiled kernel on, taken conservatively: each tensor's dtype and address mod 16,
each integer's residue mod 16, equality to 1, sign and 32-bit range, the other arguments'
types (bools by value), the keyword arguments (constexprs, warps), the autotuner's key
arguments by value, and the device. Positional arguments fill the kernel's
parameters in order and keyword arguments name the rest, as in every launcher here.

Under TRITON_INTERPRET=1 (no compiled kernels) `launcher` returns the kernel itself.
"""

from __future__ import annotations

from typing import Any

import torch

from .dispatch import triton_interpret

_INT32_MAX = 0x7FFFFFFF
_TENSOR = torch.Tensor


def _other_spec(a):
    """The class of an argument other than a plain tensor or a 32-bit integer above 1: 1 apart
    (Triton makes it a constant), 0, negative and 64-bit integers apart, bools by value, any
    other value by its type."""
    if isinstance(a, torch.Tensor):  # a subclass (the exact class is taken inline)
        return (a.dtype, a.data_ptr() & 15)
    if a.__class__ is int:
        if a == 1:
            return 16
        return (a & 15) + (32 if a > _INT32_MAX else 64 if a >= -_INT32_MAX - 1 else 96)
    if a.__class__ is bool:
        return (bool, a)
    return a.__class__


def _signature(args: tuple) -> tuple:
    """What Triton specialises a compiled kernel on, per positional argument (a superset): a
    tensor's dtype and address mod 16, a 32-bit integer's residue mod 16 (Triton marks
    multiples of 16), else `_other_spec`. Written inline for the host time it saves."""
    return tuple([(a.dtype, a.data_ptr() & 15) if a.__class__ is _TENSOR
                  else a & 15 if a.__class__ is int and 1 < a <= _INT32_MAX
                  else _other_spec(a) for a in args])


class Launcher:
    """`kernel[grid](...)` with a cache of the compiled kernels it launched; see the module
    docstring. Counts its direct launches (`direct`) and Triton's (`through_triton`)."""

    def __init__(self, kernel):
        from triton.runtime.autotuner import Autotuner

        self.kernel = kernel
        self.autotuner = kernel if isinstance(kernel, Autotuner) else None
        jit = kernel.fn if self.autotuner is not None else kernel
        self.arg_names = tuple(jit.arg_names)
        tuned = tuple(self.autotuner.keys) if self.autotuner is not None else ()
        self.tuned_indices = tuple(self.arg_names.index(k) for k in tuned)
        self.compiled: dict[tuple, tuple[Any, tuple]] = {}
        self.direct = 0
        self.through_triton = 0

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        # The first argument's device stands for the current one: every launcher here runs
        # under on_device(its first tensor), and a compiled kernel is loaded per device.
        first = args[0] if args else None
        key = (_signature(args), tuple(kwargs.items()),
               tuple([args[i] for i in self.tuned_indices]),
               first.get_device() if isinstance(first, torch.Tensor) else None)
        hit = self.compiled.get(key)
        if hit is not None:
            compiled, rest = hit
            values = args + rest
            if callable(grid):
                grid = grid(dict(zip(self.arg_names, values)))
            self.direct += 1
            compiled[_grid3(grid)](*values)
            return compiled
        self.through_triton += 1
        compiled = self.kernel[grid](*args, **kwargs)
        if _launchable(compiled):
            chosen = dict(kwargs)
            if self.autotuner is not None:
                chosen.update(self.autotuner.best_config.kwargs)
            try:  # the parameters after the positional ones, in the kernel's order
                rest = tuple(chosen[name] for name in self.arg_names[len(args):])
            except KeyError:  # a parameter left to its default: keep Triton's path
                return compiled
            self.compiled[key] = (compiled, rest)
        return compiled


def _grid3(grid) -> tuple[int, int, int]:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


def _launchable(compiled) -> bool:
    """A compiled kernel that can be launched as compiled[grid](*all_arguments)."""
    return (compiled is not None and hasattr(compiled, "function")
            and callable(getattr(type(compiled), "__getitem__", None)))


_LAUNCHERS: dict[int, Launcher] = {}


def launcher(kernel):
    """The cached launcher of `kernel` (a JITFunction or an autotuner over one), or the kernel
    itself under TRITON_INTERPRET=1."""
    found = _LAUNCHERS.get(id(kernel))
    if found is not None:
        return found
    if triton_interpret():
        return kernel
    found = _LAUNCHERS[id(kernel)] = Launcher(kernel)
    return found
