"""The LayerNorm ops' Triton kernels as they were before issue 31: a whole row per program in
registers, padded to the next power of two (at D = 1152 a 2048-wide tile: 44% of the lanes
masked off). Kept reachable as the `triton_padded` backend of layernorm_modulate and
gated_residual_layernorm_modulate so that a GPU run can time the chunked kernels
(onestep_kernels.ops.layernorm_core) against them in one run (`gpu_check`'s memory_bound row
times every backend); remove once that measurement is in the README.
"""

from __future__ import annotations

import functools

import torch

from .. import tuning
from ..kernel_config import KernelConfig
from ..triton_compat import direct, tl, triton
from ..tuning import ELEMENT_BYTES, ROW_WARPS, warps_options
from .common import add_up_partials, bn_strides, cdiv, modulation_strides, next_power_of_2
from .layernorm_core import modulate, stats_or_placeholder


@functools.cache  # asked at every launch
def row_block(D: int) -> int:
    """BLOCK_D for rows of D elements kept whole in registers."""
    return max(16, next_power_of_2(D))


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


# ---- layernorm_modulate ----------------------------------------------------------------------

# The Triton kernels keep a whole row in registers; past 4096 the backward spills on sm_80/90
# (the compile check in onestep_kernels.aot finds it), so wider rows go to another backend.
LAYERNORM_MAX_D = 4096
# Rows of one sample handled by one backward program; also the granularity of the per-sample
# partial sums (fixed, so results do not depend on the GPU).
ROWS_PER_PROGRAM = 16


@triton.jit
def _padded_layernorm_modulate_fwd_kernel(
    X, SHIFT, SCALE, OUT, STATS, n_rows,
    N, D, x_sb, x_sn, shift_sb, shift_sn, scale_sb, scale_sn, eps,
    BLOCK_D: tl.constexpr, KEEP_STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + b * x_sb + n * x_sn + cols, mask=mask, other=0.0).to(tl.float32)
    mean, rstd, centred = row_statistics(x, mask, D, eps)
    shift = tl.load(SHIFT + b * shift_sb + n * shift_sn + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0).to(tl.float32)
    out = modulate(centred * rstd, shift, scale)
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)
    if KEEP_STATS:  # for a backward; STATS: the rows' means, then their rstds (2 B N)
        tl.store(STATS + row, mean)
        tl.store(STATS + n_rows + row, rstd)


@triton.jit
def _padded_layernorm_modulate_bwd_loads(DY, X, SCALE, STATS, n_rows, b, n, N, D, x_sb, x_sn,
                                  scale_sb, scale_sn, cols, width):
    """Row n of sample b's backward inputs, as stored: dy, x, scale, mean, rstd (`width`: D, or
    0 for a row past the chunk, which loads zeros)."""
    row = b * N + n
    mask = cols < width
    dy = tl.load(DY + row * D + cols, mask=mask, other=0.0)
    x = tl.load(X + b * x_sb + n * x_sn + cols, mask=mask, other=0.0)
    scale = tl.load(SCALE + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0)
    mean = tl.load(STATS + row, mask=n < N, other=0.0)
    rstd = tl.load(STATS + n_rows + row, mask=n < N, other=0.0)
    return dy, x, scale, mean, rstd


@triton.jit
def _padded_layernorm_modulate_bwd_kernel(
    DY, X, SCALE, STATS, n_rows, DX, DMOD, plane,
    N, D, x_sb, x_sn, scale_sb, scale_sn,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PER_TOKEN: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # Program (b, c) handles rows n in [c * ROWS, (c + 1) * ROWS) of sample b. DMOD holds the
    # shift gradient and, `plane` elements further, the scale gradient. Per-token: it writes
    # their rows ((2, B, N, D)). Per-sample: it writes its partial sums to [b, c] of
    # (2, B, chunks, D) fp32, which the launcher adds up (no atomics: deterministic).
    # PREFETCH: each row's loads are issued one iteration ahead, so that their latency
    # overlaps the previous row's reductions (Triton does not pipeline this loop itself).
    DSHIFT = DMOD
    DSCALE = DMOD + plane
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_start = c * ROWS
    n_end = tl.minimum(n_start + ROWS, N)
    if PREFETCH:
        dy_next, x_next, scale_next, mean_next, rstd_next = _padded_layernorm_modulate_bwd_loads(
            DY, X, SCALE, STATS, n_rows, b, n_start, N, D, x_sb, x_sn, scale_sb, scale_sn,
            cols, tl.where(n_start < n_end, D, 0))
    for n in range(n_start, n_end):
        row = b * N + n
        if PREFETCH:
            dy, x, scale, mean, rstd = dy_next, x_next, scale_next, mean_next, rstd_next
            dy_next, x_next, scale_next, mean_next, rstd_next = _padded_layernorm_modulate_bwd_loads(
                DY, X, SCALE, STATS, n_rows, b, n + 1, N, D, x_sb, x_sn, scale_sb, scale_sn,
                cols, tl.where(n + 1 < n_end, D, 0))
        else:
            dy, x, scale, mean, rstd = _padded_layernorm_modulate_bwd_loads(
                DY, X, SCALE, STATS, n_rows, b, n, N, D, x_sb, x_sn, scale_sb, scale_sn, cols,
                D)
        dy = dy.to(tl.float32)
        x = x.to(tl.float32)
        xhat = normalised(x, mask, mean, rstd)
        dx = layernorm_input_grad(dy * (1.0 + scale.to(tl.float32)), xhat, rstd, D)
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if PER_TOKEN:
            tl.store(DSHIFT + row * D + cols, dy.to(DSHIFT.dtype.element_ty), mask=mask)
            tl.store(DSCALE + row * D + cols, (dy * xhat).to(DSCALE.dtype.element_ty), mask=mask)
        else:
            acc_shift += dy
            acc_scale += dy * xhat
    if not PER_TOKEN:
        part = (b * tl.num_programs(1) + c) * D
        tl.store(DSHIFT + part + cols, acc_shift, mask=mask)
        tl.store(DSCALE + part + cols, acc_scale, mask=mask)


# Elements of a row per thread at most: the backward keeps seven row-sized fp32 values live
# and spills past 16 (onestep_kernels.aot finds it).
LAYERNORM_MAX_PER_THREAD = 16


def _layernorm_warps(block_d: int, element_bytes: int) -> tuple[int, ...]:
    return row_warps(block_d, element_bytes, LAYERNORM_MAX_PER_THREAD)


def layernorm_configs():
    """Every configuration the launchers below can pick, for onestep_kernels.aot."""
    return row_kernel_configs("padded_layernorm_modulate", _padded_layernorm_modulate_fwd_kernel,
                                   _padded_layernorm_modulate_bwd_kernel, LAYERNORM_MAX_D, LAYERNORM_MAX_PER_THREAD,
                                   ROWS_PER_PROGRAM, ("DMOD",))


def layernorm_fwd(x, shift, scale, out, stats, eps, launch=direct):
    B, N, D = x.shape
    block_d = row_block(D)
    kernel, options = tuning.select(_padded_layernorm_modulate_fwd_kernel,
                                    _layernorm_warps(block_d, x.element_size()), ("D",))
    launch(kernel)[(B * N,)](
        x, shift, scale, out, stats_or_placeholder(stats, x.device), B * N, N, D,
        *bn_strides(x), *bn_strides(shift), *bn_strides(scale), eps, BLOCK_D=block_d,
        KEEP_STATS=stats is not None, **options)


def layernorm_bwd(dy, x, scale, stats, dx, dmod, eps, launch=direct):
    B, N, D = x.shape
    per_token = scale.dim() == 3
    block_d = row_block(D)
    kernel, options = tuning.select_variants(
        _padded_layernorm_modulate_bwd_kernel,
        bwd_options(block_d, x.element_size(), LAYERNORM_MAX_PER_THREAD), ("D",))
    chunks = cdiv(N, ROWS_PER_PROGRAM)
    # Per-sample: the programs' partial sums, added up into dmod after the launch.
    grads = dmod if per_token else x.new_empty((2, B, chunks, D), dtype=torch.float32)
    launch(kernel)[(B, chunks)](
        dy, x, scale, stats, B * N, dx, grads, grads.stride(0), N, D, *bn_strides(x),
        *bn_strides(scale), ROWS=ROWS_PER_PROGRAM, BLOCK_D=block_d,
        PER_TOKEN=per_token, **options)
    if not per_token:
        add_up_partials(grads, 2, dmod, in_graph=launch is not direct)



# ---- gated_residual_layernorm_modulate --------------------------------------------------------

# A row lives in registers. The backward keeps about eleven row-sized values live and spilled
# on sm_80/sm_90 at BLOCK_D=4096 with 8 or 16 warps (onestep_kernels.aot), so wider rows go to
# another backend. DiT widths (384..1152) are well inside.
GATED_MAX_D = 2048


@triton.jit
def _padded_gated_residual_layernorm_modulate_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, RES, OUT, STATS, n_rows,
    N, D, gate_sb, gate_sn, shift_sb, shift_sn, scale_sb, scale_sn, eps,
    BLOCK_D: tl.constexpr, KEEP_STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * gate_sb + n * gate_sn + cols, mask=mask, other=0.0).to(tl.float32)
    r = x + gate * y
    mean, rstd, centred = row_statistics(r, mask, D, eps)
    shift = tl.load(SHIFT + b * shift_sb + n * shift_sn + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(RES + row * D + cols, r.to(RES.dtype.element_ty), mask=mask)
    out = modulate(centred * rstd, shift, scale)
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)
    if KEEP_STATS:  # for a backward; STATS: the rows' means, then their rstds (2 B N)
        tl.store(STATS + row, mean)
        tl.store(STATS + n_rows + row, rstd)


@triton.jit
def _padded_gated_residual_layernorm_modulate_bwd_loads(DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows,
                                                 b, n, N, D, gate_sb, gate_sn, scale_sb,
                                                 scale_sn, cols, width):
    """Row n of sample b's backward inputs, as stored: dres, dout, x, y, gate, scale, mean,
    rstd (`width`: D, or 0 for a row past the chunk, which loads zeros)."""
    row = b * N + n
    mask = cols < width
    dres = tl.load(DRES + row * D + cols, mask=mask, other=0.0)
    dout = tl.load(DOUT + row * D + cols, mask=mask, other=0.0)
    x = tl.load(X + row * D + cols, mask=mask, other=0.0)
    y = tl.load(Y + row * D + cols, mask=mask, other=0.0)
    gate = tl.load(GATE + b * gate_sb + n * gate_sn + cols, mask=mask, other=0.0)
    scale = tl.load(SCALE + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0)
    mean = tl.load(STATS + row, mask=n < N, other=0.0)
    rstd = tl.load(STATS + n_rows + row, mask=n < N, other=0.0)
    return dres, dout, x, y, gate, scale, mean, rstd


@triton.jit
def _padded_gated_residual_layernorm_modulate_bwd_kernel(
    DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows, DX, DY, DMOD, plane,
    N, D, gate_sb, gate_sn, scale_sb, scale_sn,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PER_TOKEN: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # Program (b, c) handles rows [c * ROWS, (c + 1) * ROWS) of sample b. DMOD holds the gate,
    # shift and scale gradients, `plane` elements apart: per-token their rows ((3, B, N, D)),
    # per-sample the program's partial sums at [b, c] of (3, B, chunks, D) fp32, which the
    # launcher adds up. PREFETCH: each row's loads are issued one iteration ahead, so that
    # their latency overlaps the previous row's reductions (Triton does not pipeline this
    # loop itself). The residual is rebuilt in fp32 from x and y, as the forward computed it:
    # the statistics describe that one, not the rounded residual the forward returned.
    DGATE = DMOD
    DSHIFT = DMOD + plane
    DSCALE = DMOD + 2 * plane
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_start = c * ROWS
    n_end = tl.minimum(n_start + ROWS, N)
    if PREFETCH:
        (dres_next, dout_next, x_next, y_next, gate_next, scale_next, mean_next,
         rstd_next) = _padded_gated_residual_layernorm_modulate_bwd_loads(
            DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows, b, n_start, N, D, gate_sb, gate_sn,
            scale_sb, scale_sn, cols, tl.where(n_start < n_end, D, 0))
    for n in range(n_start, n_end):
        row = b * N + n
        if PREFETCH:
            dres, dout, x, y, gate, scale, mean, rstd = (
                dres_next, dout_next, x_next, y_next, gate_next, scale_next, mean_next,
                rstd_next)
            (dres_next, dout_next, x_next, y_next, gate_next, scale_next, mean_next,
             rstd_next) = _padded_gated_residual_layernorm_modulate_bwd_loads(
                DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows, b, n + 1, N, D, gate_sb,
                gate_sn, scale_sb, scale_sn, cols, tl.where(n + 1 < n_end, D, 0))
        else:
            dres, dout, x, y, gate, scale, mean, rstd = (
                _padded_gated_residual_layernorm_modulate_bwd_loads(
                    DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows, b, n, N, D, gate_sb,
                    gate_sn, scale_sb, scale_sn, cols, D))
        dout = dout.to(tl.float32)
        y = y.to(tl.float32)
        gate = gate.to(tl.float32)
        xhat = normalised(x.to(tl.float32) + gate * y, mask, mean, rstd)
        if PER_TOKEN:  # stored once known (after the row sums, Triton 3.6 spilled at fp16)
            tl.store(DSHIFT + row * D + cols, dout.to(DSHIFT.dtype.element_ty), mask=mask)
            tl.store(DSCALE + row * D + cols, (dout * xhat).to(DSCALE.dtype.element_ty),
                     mask=mask)
        g = dout * (1.0 + scale.to(tl.float32))
        dr = dres.to(tl.float32) + layernorm_input_grad(g, xhat, rstd, D)
        tl.store(DX + row * D + cols, dr.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + row * D + cols, (dr * gate).to(DY.dtype.element_ty), mask=mask)
        if PER_TOKEN:
            tl.store(DGATE + row * D + cols, (dr * y).to(DGATE.dtype.element_ty), mask=mask)
        else:
            acc_gate += dr * y
            acc_shift += dout
            acc_scale += dout * xhat
    if not PER_TOKEN:
        part = (b * tl.num_programs(1) + c) * D
        tl.store(DGATE + part + cols, acc_gate, mask=mask)
        tl.store(DSHIFT + part + cols, acc_shift, mask=mask)
        tl.store(DSCALE + part + cols, acc_scale, mask=mask)


# Elements of a row per thread at most: past 8 the backward (more row-sized values live
# than layernorm_modulate's) spills at BLOCK_D=2048 (onestep_kernels.aot finds it).
GATED_MAX_PER_THREAD = 8


def _gated_warps(block_d: int, element_bytes: int) -> tuple[int, ...]:
    return row_warps(block_d, element_bytes, GATED_MAX_PER_THREAD)


def gated_configs():
    """Every configuration the launchers below can pick, for onestep_kernels.aot."""
    return row_kernel_configs("padded_gated_residual_layernorm_modulate",
                                   _padded_gated_residual_layernorm_modulate_fwd_kernel,
                                   _padded_gated_residual_layernorm_modulate_bwd_kernel, GATED_MAX_D,
                                   GATED_MAX_PER_THREAD, ROWS_PER_PROGRAM, ("DMOD",))


def gated_fwd(x, y, gate, shift, scale, res, out, stats, eps, launch=direct):
    B, N, D = x.shape
    block_d = row_block(D)
    kernel, options = tuning.select(_padded_gated_residual_layernorm_modulate_fwd_kernel,
                                    _gated_warps(block_d, x.element_size()), ("D",))
    launch(kernel)[(B * N,)](
        x, y, gate, shift, scale, res, out, stats_or_placeholder(stats, x.device), B * N,
        N, D, *modulation_strides(gate, shift, scale), eps, BLOCK_D=block_d,
        KEEP_STATS=stats is not None, **options)


def gated_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, eps, launch=direct):
    B, N, D = x.shape
    per_token = gate.dim() == 3
    block_d = row_block(D)
    kernel, options = tuning.select_variants(
        _padded_gated_residual_layernorm_modulate_bwd_kernel,
        bwd_options(block_d, x.element_size(), GATED_MAX_PER_THREAD), ("D",))
    chunks = cdiv(N, ROWS_PER_PROGRAM)
    # Per-sample: the programs' partial sums, added up into dmod after the launch.
    grads = dmod if per_token else x.new_empty((3, B, chunks, D), dtype=torch.float32)
    launch(kernel)[(B, chunks)](
        dres, dout, x, y, gate, scale, stats, B * N, dx, dy, grads, grads.stride(0), N, D,
        *bn_strides(gate), *bn_strides(scale), ROWS=ROWS_PER_PROGRAM, BLOCK_D=block_d,
        PER_TOKEN=per_token, **options)
    if not per_token:
        add_up_partials(grads, 2, dmod, in_graph=launch is not direct)
