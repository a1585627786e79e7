"""Plumbing every op file shares: launcher lookup, device context, stride helpers and the
backend limits that are the same for every op."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import dispatch


def launcher(table: dict, backend: str):
    """The op's launcher for `backend`; the torch backend never reaches a registered op."""
    if backend not in table:
        raise ValueError(f"backend: the registered op runs {sorted(table)}, got {backend!r} "
                         "(the torch backend is the reference, called without the op)")
    return table[backend]


def on_device(t: Tensor):
    """Launch on t's GPU whatever the current device is (nothing to do on the CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def bn_strides(t: Tensor) -> tuple[int, int]:
    """Element strides of a (B, N, D) tensor's (B, N) dimensions; a (B, D) modulation tensor
    broadcasts over N (stride 0)."""
    return (t.stride(0), 0) if t.dim() == 2 else (t.stride(0), t.stride(1))


def interpreter_bf16_reason(t: Tensor, name: str) -> str | None:
    """Why Triton cannot take `t`: the interpreter (CPU tensors) computes bfloat16 wrongly."""
    if t.dtype == torch.bfloat16 and not t.is_cuda:
        return f"{name}: the Triton interpreter computes bfloat16 wrongly"
    return None


def backward_for_cuda(fallback: str) -> str:
    """Backend for the backward of an op whose cuda backend has no CUDA C++ backward: Triton's
    kernel when Triton can run, else `fallback` (PyTorch ops)."""
    return "triton" if dispatch.unavailable_reason("triton") is None else fallback
