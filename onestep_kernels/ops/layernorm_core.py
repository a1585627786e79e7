"""The LayerNorm core that every Triton kernel with a LayerNorm shares: a row's statistics,
the adaLN modulation, and the backward's row reductions. Written once, so that a fix to the
arithmetic reaches every kernel (the CPU and CUDA kernels share theirs in csrc/common).

All take and return fp32 register rows of BLOCK_D elements with the padding masked out.
"""

from __future__ import annotations

from ..triton_compat import tl, triton


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
