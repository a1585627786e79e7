"""The LayerNorm core that every Triton kernel with a LayerNorm shares: a row's statistics,
the adaLN modulation, and the backward's row reductions. Written once, so that a fix to the
arithmetic reaches every kernel (the CPU and CUDA kernels share theirs in csrc/common).

All take and return fp32 register rows of BLOCK_D elements with the padding masked out.
"""

from __future__ import annotations

import functools

import torch

from ..kernel_config import KernelConfig
from ..triton_compat import tl, triton
from ..tuning import ELEMENT_BYTES, ROW_WARPS, warps_options
from .common import next_power_of_2


@functools.cache  # asked at every launch
def row_block(D: int) -> int:
    """BLOCK_D for rows of D elements kept whole in registers."""
    return max(16, next_power_of_2(D))


@functools.cache
def _placeholder(device: torch.device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


def stats_or_placeholder(stats: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The forward kernels' STATS argument: the statistics buffer, or where none is kept
    (inference: KEEP_STATS=False, nothing is written) one fp32 element per device, made once,
    so that an inference call allocates nothing it does not return."""
    return _placeholder(device) if stats is None else stats


def row_warps(block_d: int, element_bytes: int, max_per_thread: int) -> tuple[int, ...]:
    """The warp counts autotune may pick for such a row (see onestep_kernels.tuning)."""
    return warps_options(block_d, element_bytes, max_per_thread, ROW_WARPS)


# Row blocks from which the backward may load each row a row ahead (PREFETCH): DiT widths
# (384..1152, blocks 512..2048) and up. Narrower rows are cheap enough for many programs to
# share an SM and hide each other's latency, and one of them spilled with it (the gated
# backward, fp16, 256, two warps, sm_80).
PREFETCH_MIN_BLOCK = 512


def _prefetch_options(block_d: int) -> tuple[bool, ...]:
    return (False, True) if block_d >= PREFETCH_MIN_BLOCK else (False,)


@functools.cache  # asked at every backward launch
def bwd_options(block_d: int, element_bytes: int, max_per_thread: int) -> tuple:
    """What autotune may pick for a backward over such rows (tuning.select_variants): each warp
    count without, then (blocks from PREFETCH_MIN_BLOCK) with, the next row's loads issued a
    row ahead. The first, launched where autotune is off, is the backward without PREFETCH."""
    warps = row_warps(block_d, element_bytes, max_per_thread)
    return tuple(((("PREFETCH", prefetch),), w) for prefetch in _prefetch_options(block_d)
                 for w in warps)


def row_kernel_configs(name: str, fwd_kernel, bwd_kernel, max_width: int, max_per_thread: int,
                       bwd_rows: int, partial_sums: tuple[str, ...]):
    """Every configuration the launchers of a row-in-registers LayerNorm op can pick (each
    block, dtype, warp count and per-token flag), for onestep_kernels.aot. `partial_sums`:
    the backward's per-sample gradient outputs, fp32 partial sums unless per-token."""
    block = 16
    while block <= max_width:
        for dtype, element_bytes in ELEMENT_BYTES.items():
            for warps in row_warps(block, element_bytes, max_per_thread):
                for keep in (False, True):
                    yield KernelConfig(  # (the statistics: two scalar stores per row)
                        f"{name}_fwd[{dtype},BLOCK_D={block},KEEP_STATS={keep},warps={warps}]",
                        fwd_kernel, dtype, {"BLOCK_D": block, "KEEP_STATS": keep}, warps,
                        fp32=("STATS",), row_scalars=2)
                for per_token in (False, True):
                    for prefetch in _prefetch_options(block):
                        yield KernelConfig(
                            f"{name}_bwd[{dtype},BLOCK_D={block},PER_TOKEN={per_token},"
                            f"PREFETCH={prefetch},warps={warps}]",
                            bwd_kernel, dtype,
                            {"ROWS": bwd_rows, "BLOCK_D": block, "PER_TOKEN": per_token,
                             "PREFETCH": prefetch},
                            warps, fp32=("STATS", *(() if per_token else partial_sums)),
                            # two scalar loads per row; a PREFETCH backward loads the first
                            # row's before its loop too
                            row_scalars=4 if prefetch else 2)
        block *= 2


@triton.jit
def row_statistics(x, mask, D, eps):
    """(mean, rstd, x - mean with padding zeroed) of a row, in two passes: the squared
    deviations are summed around the mean, which keeps large offsets exact. Triton's sums are
    tree reductions, so the rounding error does not grow with the row's length."""
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    return mean, rstd, centred


@triton.jit
def modulate(xhat, shift, scale):
    """adaLN modulation of a normalised row: xhat * (1 + scale) + shift."""
    return xhat * (1.0 + scale) + shift


@triton.jit
def normalised(x, mask, mean, rstd):
    """xhat = (x - mean) * rstd, with the padding zeroed (it enters the row sums)."""
    return tl.where(mask, (x - mean) * rstd, 0.0)


@triton.jit
def layernorm_input_grad(g, xhat, rstd, D):
    """d LayerNorm / d x for a row, given g = dy * (1 + scale) (padding zero):
    rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    mean_g = tl.sum(g, axis=0) / D
    mean_gx = tl.sum(g * xhat, axis=0) / D
    return rstd * (g - mean_g - xhat * mean_gx)
