"""Argument validation and dtype handling shared by the public op entry points.

Every failure raises errors.ArgumentTypeError (a TypeError: wrong kind of thing, wrong dtype)
or errors.ArgumentError (a ValueError: wrong shape or value) whose message starts with the
argument's name. The checks read only cheap tensor attributes: they run once per public call,
never inside composed ops. Devices and layouts are checked where every path passes, at the
launch boundary (op_spec.Op.check, written by op_entry).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import ALL_DTYPES as FLOAT_DTYPES  # what some backend of every op takes
from .errors import ArgumentError, ArgumentTypeError
from .torch_compat import any_autocast


def tensor(name: str, value, ndims: tuple[int, ...]) -> Tensor:
    """A float Tensor of one of the ranks `ndims`."""
    if not isinstance(value, Tensor):
        _not_tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:  # (float_dtype inline: this runs at every call)
        _not_float(name, value)
    if value.dim() not in ndims:
        shapes = " or ".join(f"{n}-D" for n in ndims)
        raise ArgumentError(f"{name}: expected a {shapes} tensor, got shape "
                            f"{tuple(value.shape)}")
    return value


def float_dtype(name: str, value: Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        _not_float(name, value)


# The failures, raised out of line: the checks above run at every call.


def _not_tensor(name: str, value):
    raise ArgumentTypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def _not_float(name: str, value: Tensor):
    raise ArgumentTypeError(f"{name}: expected dtype float32, float16, bfloat16 or float64, "
                            f"got {value.dtype}")


def same_device(name: str, value: Tensor, like: Tensor, like_name: str) -> None:
    if value.device != like.device:
        raise ArgumentError(f"{name}: is on {value.device} but {like_name} is on "
                            f"{like.device}")


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ArgumentError(f"{name}: expected a finite positive number, got {value}")
    return float(value)


# ---- dtypes: mixed inputs and autocast ------------------------------------------------------
# How an op chooses the dtype it computes in, so that it agrees with its reference expression:
#   PROMOTE       type promotion over the inputs, as `x + bias` does (autocast leaves it alone);
#   LAYER_NORM    as F.layer_norm under autocast: float32 under CUDA autocast (torch's CUDA
#                 autocast list runs layer_norm in fp32; its CPU list does not), else PROMOTE;
#   LOWER         as SDPA: the autocast dtype under autocast, else PROMOTE.
PROMOTE, LAYER_NORM, LOWER = "promote", "layer_norm", "lower"


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for any device type (meta has no autocast)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


# `any_autocast()` (torch_compat): whether any autocast is on, one cheap call before asking
# about a device (whose type string costs more than the question). Entry points whose tensors
# share a dtype skip compute_dtype when it says no.


def compute_dtype(policy: str, tensors) -> torch.dtype:
    """The dtype an op computes in, by `policy`, for tensors on one device (the first's)."""
    if policy != PROMOTE and any_autocast():
        device_type = tensors[0].device.type
        if autocast_enabled(device_type):
            if policy == LOWER:
                return torch.get_autocast_dtype(device_type)
            if device_type == "cuda":
                return torch.float32
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None and t.dtype is not dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype is dtype else t.to(dtype)
