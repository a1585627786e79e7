"""Plumbing every op file shares: stride helpers, launch-size arithmetic, the sum of a
backward's partial sums, and the test for whether a call records gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ..op_spec import needs_grad  # noqa: F401  (the op files' import of it)

# Host-side sizes of launch grids and blocks. (Triton 3.9's triton.cdiv and
# triton.next_power_of_2 are ConstexprFunction objects: 2.3 us per call from Python.)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def add_up_partials(partials: Tensor, dim: int, out: Tensor, in_graph: bool = False) -> None:
    """out = partials.sum(dim), the fp32 partial sums of a backward's programs added in fp32
    and rounded once to out's dtype. Where out is fp32 (the LayerNorm ops' dtype under CUDA
    autocast) an eager call writes the sum straight into out: one op and no temporary. A
    lower-precision out= would round every partial before adding (torch.sum reduces in out's
    dtype), so others sum then copy; so does a traced call (`in_graph`, a triton_op body,
    kept as it was)."""
    if out.dtype is torch.float32 and not in_graph:
        torch.sum(partials, dim=dim, out=out)
    else:
        out.copy_(partials.sum(dim=dim))


def _bn(strides: tuple[int, ...]) -> tuple[int, int]:
    return (strides[0], 0) if len(strides) == 2 else strides[:2]


def bn_strides(t: Tensor) -> tuple[int, int]:
    """Element strides of a (B, N, D) tensor's (B, N) dimensions; a (B, D) modulation tensor
    broadcasts over N (stride 0)."""
    return _bn(t.stride())


def modulation_strides(gate: Tensor, shift: Tensor, scale: Tensor) -> tuple[int, ...]:
    """bn_strides of three modulation tensors, flattened; chunks of one adaLN output (the usual
    call) share their strides, read and converted once then (~0.2 us less)."""
    strides = gate.stride()
    if shift.stride() == strides == scale.stride():
        return _bn(strides) * 3
    return (*_bn(strides), *bn_strides(shift), *bn_strides(scale))
