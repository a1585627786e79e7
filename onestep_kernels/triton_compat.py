"""Triton, or a stand-in when it is not installed, so that op modules import either way.

With the stand-in, `@triton.jit` keeps the plain function (never called: the dispatcher
reports the triton backend unavailable) and `tl.constexpr` exists for annotations;
`triton_op` registers a plain custom op and `wrap_triton` is the identity.
"""

from __future__ import annotations

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


def direct(kernel):
    """The eager launch: the kernel itself (the counterpart of wrap_triton)."""
    return kernel


__all__ = ["HAS_TRITON", "direct", "triton", "tl", "triton_op", "wrap_triton"]
