"""Plumbing every op file shares: the device context, stride helpers, the test for whether a
call records gradients, and the eager entry into an op's autograd.Function."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

_NO_CONTEXT = contextlib.nullcontext()


def on_device(t: Tensor):
    """Launch on t's GPU whatever the current device is (nothing to do on the CPU, or when it
    is already current)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_CONTEXT


def bn_strides(t: Tensor) -> tuple[int, int]:
    """Element strides of a (B, N, D) tensor's (B, N) dimensions; a (B, D) modulation tensor
    broadcasts over N (stride 0)."""
    strides = t.stride()
    return (strides[0], 0) if len(strides) == 2 else strides[:2]


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors records gradients."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


_functorch_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def eager_apply(function: type[torch.autograd.Function], tensors: int) -> Callable:
    """`function.apply` for calls whose first `tensors` arguments are tensors, less the Python
    wrapper's cost (about 2 us of a LayerNorm op's 21 with autograd, dev VM): the C++ apply
    after the wrapper's own two steps, done cheaply (functorch transforms get the wrapper,
    which handles them; otherwise dead functorch wrappers are unwrapped, as the wrapper does).
    The wrapper's third step, binding default arguments, only serves Functions that define
    setup_context, which these do not."""
    apply = super(torch.autograd.Function, function).apply  # the C++ _FunctionBase.apply
    if torch.autograd.function._is_setup_context_defined(function.setup_context):
        raise TypeError(f"{function.__name__} defines setup_context: use its apply")

    def call(*args):
        if _functorch_active():
            return function.apply(*args)
        return apply(*map(_unwrap_if_dead, args[:tensors]), *args[tensors:])

    return call
