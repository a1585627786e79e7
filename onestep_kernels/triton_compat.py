"""Triton, or a stand-in when it is not installed, so that op modules import either way.

With the stand-in, `@triton.jit` keeps the plain function (never called: the dispatcher
reports the triton backend unavailable) and `tl.constexpr` exists for annotations;
`triton_op` registers a plain custom op and `wrap_triton` is the identity.
"""

from __future__ import annotations

import re
import types

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(0, (n - 1).bit_length()))
    tl = types.SimpleNamespace(constexpr=object)
    triton_op = torch.library.custom_op

    def wrap_triton(kernel):
        return kernel


def interpreter_problem() -> str | None:
    """Why Triton's interpreter (TRITON_INTERPRET=1) cannot run onestep's kernels here, or
    None. Triton up to 3.6 turns one-element NumPy arrays into loop bounds with int(), which
    NumPy 2.4 refuses: every kernel with a loop fails (triton-lang/triton#9171, fixed in 3.7)."""
    import numpy

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if HAS_TRITON and major_minor(triton.__version__) < (3, 7) and (
            major_minor(numpy.__version__) >= (2, 4)):
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy "
                f"{numpy.__version__} (triton-lang/triton#9171): install numpy<2.4 or "
                "triton>=3.7")
    return None


def direct(kernel):
    """The eager launch: the kernel itself (the counterpart of wrap_triton)."""
    return kernel


__all__ = ["HAS_TRITON", "direct", "interpreter_problem", "triton", "tl", "triton_op",
           "wrap_triton"]
