"""Plumbing every op file shares: the device context, stride helpers, and the test for
whether a call records gradients."""

from __future__ import annotations

import contextlib

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
