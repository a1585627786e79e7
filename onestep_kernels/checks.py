"""Argument validation shared by the public op entry points.

Every failure raises TypeError (wrong kind of thing, wrong dtype) or ValueError (wrong shape,
device or layout) whose message starts with the argument's name.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, value, ndims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {value.dtype}")
    if value.dim() not in ndims:
        shapes = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}: expected a {shapes} tensor, got shape {tuple(value.shape)}")
    if value.dim() > 0 and value.shape[-1] > 1 and value.stride(-1) != 1:
        raise ValueError(
            f"{name}: the last dimension must be contiguous (stride 1), got strides "
            f"{value.stride()}; call .contiguous() first"
        )
    return value


def same_dtype_device(name: str, value: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if value.device != like.device:
        raise ValueError(f"{name}: is on {value.device} but {like_name} is on {like.device}")
    if value.dtype != like.dtype:
        raise TypeError(f"{name}: has dtype {value.dtype} but {like_name} has {like.dtype}")


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {value}")
    return float(value)
