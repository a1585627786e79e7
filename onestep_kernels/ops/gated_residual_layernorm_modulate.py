"""gated_residual_layernorm_modulate: a DiT block's gated residual and the next modulated
LayerNorm in one pass over each row.

    residual = x + gate * y
    out      = LayerNorm(residual) * (1 + scale) + shift          (no affine, eps added to var)

x, y are (B, N, D); gate, shift, scale are all (B, D) per-sample or all (B, N, D) per-token.
Returns (residual, out); both carry gradients. Arithmetic in fp32 (the LayerNorm sees the fp32
residual, before its rounding to the output dtype); outputs in x's dtype.

The op's whole story lives here: reference, Triton kernels and launchers, native launchers,
the backend records with the op's spec (onestep_kernels.op_spec builds the eager paths and the
torch.library registration from it) and the public entry point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks, dispatch, native, tuning
from ..dispatch import Backend
from ..errors import ArgumentError
from ..op_spec import Op, OpSpec
from ..triton_compat import direct, tl, triton
from . import layernorm_core as core
from . import padded_rows
from .common import add_up_partials, bn_strides, modulation_strides, needs_grad

# The kernels call the shared jit functions by bare name: inductor copies a user kernel's
# source with the jit functions it names, and cannot follow a module attribute (core.x).
from .layernorm_core import chunk_columns, chunk_merge, modulate, modulation_chunk

# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def reference(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
              eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Plain PyTorch, in fp32 (fp64 if given fp64); returns x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    if gate.dim() == 2:
        gate, shift, scale = gate[:, None], shift[:, None], scale[:, None]
    residual = x.to(compute) + gate.to(compute) * y.to(compute)
    normed = torch.nn.functional.layer_norm(residual, x.shape[-1:], eps=eps)
    out = normed * (1 + scale.to(compute)) + shift.to(compute)
    return residual.to(x.dtype), out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

# Program (b, c) handles rows n in [c * ROWS, (c + 1) * ROWS) of sample b as one (ROWS, CHUNK)
# tile, walking the row in chunks (onestep_kernels.ops.layernorm_core says why). Any width.
# The residual is formed in fp32 from x and y wherever it is needed (the statistics describe
# that one, not the rounded residual the forward returns); the re-reads of x and y hit the
# caches, since the program has just read them.


@triton.jit
def _gated_residual_layernorm_modulate_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, RES, OUT, STATS, n_rows,
    N, D, gate_sb, gate_sn, shift_sb, shift_sn, scale_sb, scale_sn, eps,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, PER_TOKEN: tl.constexpr,
    KEEP_STATS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = n < N
    n = n.to(tl.int64)
    rows = b * N + n
    # the tile's rows are consecutive: a 64-bit offset for it, 32-bit ones inside it
    tile = (b * N + tl.program_id(1) * ROWS) * D
    X += tile
    Y += tile
    RES += tile
    OUT += tile
    row_offsets = tl.arange(0, ROWS)[:, None] * D
    first = tl.zeros((ROWS,), dtype=tl.float32)  # the first chunk's mean (chunk_merge)
    mean = tl.zeros((ROWS,), dtype=tl.float32)
    m2 = tl.zeros((ROWS,), dtype=tl.float32)
    for k in range(0, D, CHUNK):  # the statistics, and the residual written
        cols, col_ok = chunk_columns(k, D, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = modulation_chunk(GATE, b, n, cols, mask, col_ok, gate_sb, gate_sn, PER_TOKEN)
        r = x + gate * y
        tl.store(RES + row_offsets + cols[None, :], r.to(RES.dtype.element_ty), mask=mask)
        first, mean, m2 = chunk_merge(first, mean, m2, r, mask, k, D, CHUNK)
    mean += first
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    for k in range(0, D, CHUNK):  # the output
        cols, col_ok = chunk_columns(k, D, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = modulation_chunk(GATE, b, n, cols, mask, col_ok, gate_sb, gate_sn, PER_TOKEN)
        shift = modulation_chunk(SHIFT, b, n, cols, mask, col_ok, shift_sb, shift_sn, PER_TOKEN)
        scale = modulation_chunk(SCALE, b, n, cols, mask, col_ok, scale_sb, scale_sn, PER_TOKEN)
        out = modulate((x + gate * y - mean[:, None]) * rstd[:, None], shift, scale)
        tl.store(OUT + row_offsets + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    if KEEP_STATS:  # for a backward; STATS: the rows' means, then their rstds (2 B N)
        tl.store(STATS + rows, mean, mask=row_ok)
        tl.store(STATS + n_rows + rows, rstd, mask=row_ok)


@triton.jit
def _gated_residual_layernorm_modulate_bwd_kernel(
    DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows, DX, DY, DMOD, plane,
    N, D, gate_sb, gate_sn, scale_sb, scale_sn,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # Two walks over the chunks: the first sums g = dout (1 + scale) and g xhat along each row
    # and writes the shift and scale gradients (which need neither sum); the second writes dx,
    # dy and the gate's gradient, which need the residual's gradient dr. DMOD holds the gate,
    # shift and scale gradients, `plane` elements apart: per-token their rows ((3, B, N, D)),
    # per-sample the program's column sums over its rows at [b, c] of (3, B, programs, D)
    # fp32, which the launcher adds up (no atomics: deterministic).
    DGATE = DMOD
    DSHIFT = DMOD + plane
    DSCALE = DMOD + 2 * plane
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n = c * ROWS + tl.arange(0, ROWS)
    row_ok = n < N
    n = n.to(tl.int64)
    rows = b * N + n
    mean = tl.load(STATS + rows, mask=row_ok, other=0.0)[:, None]
    rstd = tl.load(STATS + n_rows + rows, mask=row_ok, other=0.0)[:, None]
    # The tile's rows are consecutive: one 64-bit offset for the program, 32-bit ones inside
    # its tile (64-bit offsets per element held 255 registers in the unaligned fp16 per-token
    # backward with Triton 3.6, and spilled).
    tile = (b * N + c * ROWS) * D
    DRES += tile
    DOUT += tile
    X += tile
    Y += tile
    DX += tile
    DY += tile
    row_offsets = tl.arange(0, ROWS)[:, None] * D
    if PER_TOKEN:
        DGATE += tile
        DSHIFT += tile
        DSCALE += tile
    part = (b * tl.num_programs(1) + c) * D
    sum_g = tl.zeros((ROWS,), dtype=tl.float32)
    sum_gx = tl.zeros((ROWS,), dtype=tl.float32)
    for k in range(0, D, CHUNK):
        cols, col_ok = chunk_columns(k, D, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        dout = tl.load(DOUT + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = modulation_chunk(GATE, b, n, cols, mask, col_ok, gate_sb, gate_sn, PER_TOKEN)
        scale = modulation_chunk(SCALE, b, n, cols, mask, col_ok, scale_sb, scale_sn, PER_TOKEN)
        xhat = tl.where(mask, (x + gate * y - mean) * rstd, 0.0)
        g = dout * (1.0 + scale)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xhat, axis=1)
        if PER_TOKEN:
            tl.store(DSHIFT + row_offsets + cols[None, :], dout.to(DSHIFT.dtype.element_ty),
                     mask=mask)
            tl.store(DSCALE + row_offsets + cols[None, :],
                     (dout * xhat).to(DSCALE.dtype.element_ty), mask=mask)
        else:
            tl.store(DSHIFT + part + cols, tl.sum(dout, axis=0), mask=col_ok)
            tl.store(DSCALE + part + cols, tl.sum(dout * xhat, axis=0), mask=col_ok)
    mean_g = (sum_g / D)[:, None]
    mean_gx = (sum_gx / D)[:, None]
    for k in range(0, D, CHUNK):
        cols, col_ok = chunk_columns(k, D, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        dres = tl.load(DRES + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = modulation_chunk(GATE, b, n, cols, mask, col_ok, gate_sb, gate_sn, PER_TOKEN)
        scale = modulation_chunk(SCALE, b, n, cols, mask, col_ok, scale_sb, scale_sn, PER_TOKEN)
        xhat = (x + gate * y - mean) * rstd
        dr = dres + rstd * (dout * (1.0 + scale) - mean_g - xhat * mean_gx)
        tl.store(DX + row_offsets + cols[None, :], dr.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + row_offsets + cols[None, :], (dr * gate).to(DY.dtype.element_ty),
                 mask=mask)
        if PER_TOKEN:
            tl.store(DGATE + row_offsets + cols[None, :], (dr * y).to(DGATE.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(DGATE + part + cols, tl.sum(dr * y, axis=0), mask=col_ok)  # (y: 0 off the rows)


# Per-sample, per program and chunk: the forward loads gate in each walk, shift and scale in
# the second; the backward loads gate and scale in each walk and stores three partial sums.
CHUNK_VECTORS = (4, 7)


def triton_configs():
    """Every configuration the launchers below can pick (and the triton_padded backend's), for
    onestep_kernels.aot."""
    yield from core.chunk_kernel_configs(
        "gated_residual_layernorm_modulate", _gated_residual_layernorm_modulate_fwd_kernel,
        _gated_residual_layernorm_modulate_bwd_kernel, ("DMOD",), CHUNK_VECTORS)
    yield from padded_rows.gated_configs()


def triton_launches(width: int):
    """What the launchers below pick at this width, for onestep_kernels.aot's checks."""
    return core.chunk_launches("gated_residual_layernorm_modulate",
                               _gated_residual_layernorm_modulate_fwd_kernel,
                               _gated_residual_layernorm_modulate_bwd_kernel, ("DMOD",),
                               CHUNK_VECTORS, width)



def _triton_fwd(x, y, gate, shift, scale, res, out, stats, eps, launch=direct):
    B, N, D = x.shape
    chunk = core.chunk_for(D)
    kernel, options = tuning.select(_gated_residual_layernorm_modulate_fwd_kernel,
                                    core.fwd_warps(chunk, x.element_size()), ("D",))
    launch(kernel)[core.fwd_grid(B, N, chunk)](
        x, y, gate, shift, scale, res, out, core.stats_or_placeholder(stats, x.device), B * N,
        N, D, *modulation_strides(gate, shift, scale), eps, ROWS=core.fwd_rows(chunk), CHUNK=chunk,
        PER_TOKEN=gate.dim() == 3, KEEP_STATS=stats is not None, **options)


def _triton_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, eps, launch=direct):
    B, N, D = x.shape
    per_token = gate.dim() == 3
    chunk = core.chunk_for(D)
    kernel, options = tuning.select(_gated_residual_layernorm_modulate_bwd_kernel,
                                    core.bwd_warps(chunk, x.element_size()), ("D",))
    grid = core.bwd_grid(B, N)
    # Per-sample: the programs' partial sums, added up into dmod after the launch.
    grads = dmod if per_token else x.new_empty((3, *grid, D), dtype=torch.float32)
    launch(kernel)[grid](
        dres, dout, x, y, gate, scale, stats, B * N, dx, dy, grads, grads.stride(0), N, D,
        *bn_strides(gate), *bn_strides(scale), ROWS=core.BWD_ROWS, CHUNK=chunk,
        PER_TOKEN=per_token, **options)
    if not per_token:
        add_up_partials(grads, 2, dmod, in_graph=launch is not direct)


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/gated_residual_layernorm_modulate.cpp, csrc/cuda/...cu)
# ---------------------------------------------------------------------------------------------


def _fwd_params(x, y, gate, shift, scale, res, out, stats, eps):
    B, N, D = x.shape
    mean = rstd = 0  # no statistics kept (inference)
    if stats is not None:  # 2 B N floats: the rows' means, then their rstds
        mean = stats.data_ptr()
        rstd = mean + 4 * B * N
    return native.positional_params(
        "GatedResidualFwdParams",
        "x y gate shift scale res out mean rstd B N D gate_sb gate_sn shift_sb shift_sn "
        "scale_sb scale_sn eps dtype")(
            x.data_ptr(), y.data_ptr(), gate.data_ptr(), shift.data_ptr(), scale.data_ptr(),
            res.data_ptr(), out.data_ptr(), mean, rstd, B, N, D,
            *modulation_strides(gate, shift, scale), eps, native.DTYPE_CODES[x.dtype])


def _cpu_fwd(*args):
    native.run_cpu("gated_residual_layernorm_modulate_fwd", _fwd_params(*args))


def _bwd_params(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, eps, partials=0):
    B, N, D = x.shape
    mean = stats.data_ptr()
    g_sb, g_sn = bn_strides(gate)
    sc_sb, sc_sn = bn_strides(scale)
    dgate = dmod.data_ptr()  # dmod: (3, *gate.shape), contiguous
    plane = dmod.stride(0) * dmod.element_size()
    return native.positional_params(
        "GatedResidualBwdParams",
        "dres dout x y gate scale mean rstd dx dy dgate dshift dscale B N D gate_sb gate_sn "
        "scale_sb scale_sn partials per_token dtype")(
            dres.data_ptr(), dout.data_ptr(), x.data_ptr(), y.data_ptr(), gate.data_ptr(),
            scale.data_ptr(), mean, mean + 4 * B * N, dx.data_ptr(), dy.data_ptr(), dgate,
            dgate + plane, dgate + 2 * plane, B, N, D, g_sb, g_sn, sc_sb, sc_sn, partials,
            int(gate.dim() == 3), native.dtype_code(x))


def _cpu_bwd(*args):
    native.run_cpu("gated_residual_layernorm_modulate_bwd", _bwd_params(*args))


def _cuda_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, eps):
    workspace = native.cuda_partials(x, 3, gate.dim() == 3)
    native.run_cuda("gated_residual_layernorm_modulate_bwd", _bwd_params(
        dres, dout, x, y, gate, scale, stats, dx, dy, dmod, eps, native.address(workspace)), x)


def _cuda_fwd(x, *args):
    native.run_cuda("gated_residual_layernorm_modulate_fwd", _fwd_params(x, *args), x)


# ---------------------------------------------------------------------------------------------
# The spec and the backends (see onestep_kernels.op_spec and onestep_kernels.dispatch)
# ---------------------------------------------------------------------------------------------


def _allocate(backend, keep, x, y, gate, shift, scale, eps):
    """res and out (x is contiguous), and for a backward the rows' means then rstds (one flat
    fp32 buffer)."""
    B, N, _ = x.shape
    stats = x.new_empty(2 * B * N, dtype=torch.float32) if keep else None
    return torch.empty_like(x), torch.empty_like(x), stats


def _allocate_grads(x, y, gate, scale, stats, eps):
    """dx, dy, and dmod: the gradients of gate, shift and scale stacked, (3, *gate.shape) (one
    buffer, one reduction of the per-sample partial sums)."""
    return torch.empty_like(x), torch.empty_like(x), x.new_empty((3, *gate.shape))


def _example(sizes, device, dtype, generator):
    """DiT's attention branch joining the residual: gate, shift, scale views of adaLN's output."""
    x, y = (torch.randn(sizes.B, sizes.N, sizes.D, generator=generator, device=device).to(dtype)
            for _ in range(2))
    mods = torch.randn(sizes.B, 6 * sizes.D, generator=generator, device=device).to(dtype)
    return (x, y, *mods.chunk(6, dim=1)[2:5]), {}


def _eager(x, y, gate, shift, scale):
    """As a DiT writes it (per-sample modulation), in the inputs' dtype."""
    residual = x + gate[:, None] * y
    normed = torch.nn.functional.layer_norm(residual, x.shape[-1:], eps=1e-6)
    return residual, normed * (1 + scale[:, None]) + shift[:, None]


# The backward reads x and y, not the rounded residual it returned: it rebuilds the fp32
# residual that the statistics describe (in a DiT block x is saved by the first LayerNorm
# anyway, so this costs no memory there).
SPEC = OpSpec(
    "gated_residual_layernorm_modulate", inputs=("x", "y", "gate", "shift", "scale"),
    params=(("eps", float),), outputs=("res", "out", "stats"), returns=2, allocate=_allocate,
    saved=("x", "y", "gate", "scale", "stats"), grads=("dx", "dy", "dmod"),
    allocate_grads=_allocate_grads,
    input_grads=lambda dx, dy, dmod: (dx, dy, dmod[0], dmod[1], dmod[2]), empty_if=("x",),
    contiguous=("x", "y"), autocast=checks.LAYER_NORM, triton_op=True, memory_bound=True,
    example=_example, eager=_eager)

OP = Op(SPEC, [
    Backend("triton", "triton", ("cuda",), forward=_triton_fwd, backward=_triton_bwd,
            summary="rows of one sample per program, in exact chunks"),
    Backend("cuda", "cuda_library", ("cuda",), forward=_cuda_fwd, backward=_cuda_bwd,
            max_width=native.CUDA_MAX_WIDTH,
            summary="rows of one sample per block in 16-byte vectors, Chan merge"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd, backward=_cpu_bwd,
            summary="OpenMP over rows, AVX2 or portable"),
    Backend("triton_padded", "triton", ("cuda",), forward=padded_rows.gated_fwd,
            backward=padded_rows.gated_bwd, max_width=padded_rows.GATED_MAX_D,
            summary="before issue 31: a row per program padded to a power of two; kept to "
                    "time against"),
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=reference, summary="PyTorch ops"),
], default_order={"cpu": ("cpu", "reference"), "sm_90": ("triton", "cuda", "reference")},
    triton_configs=triton_configs, triton_launches=triton_launches)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@OP.public_entry
def gated_residual_layernorm_modulate(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor,
                                      scale: Tensor, eps: float = 1e-6, *,
                                      backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(x + gate * y, LayerNorm(x + gate * y) * (1 + scale) + shift), fused.

    Args:
        x, y: (B, N, D) float32/float16/bfloat16/float64 on one device; made contiguous (a
            copy only if they are not).
        gate, shift, scale: all (B, D) or all (B, N, D), on x's device, last dimension
            contiguous; strided views such as ``c.chunk(6, dim=1)`` are read in place.
            Mixed dtypes are promoted to a common one; under autocast the op follows
            F.layer_norm (float32 under CUDA autocast).
        eps: added to the variance.
        backend: one of the op's backends, or None for the fastest that can take the call.
    """
    # x fully; the others' ranks by the shape comparisons below, their dtypes by the dtype
    # comparison (and float_dtype where it fails); devices and layouts at the launch boundary
    checks.tensor("x", x, (3,))
    for name, t in (("y", y), ("gate", gate), ("shift", shift), ("scale", scale)):
        if not isinstance(t, Tensor):
            checks.tensor(name, t, ())
    if not (isinstance(eps, float) and 0.0 < eps < math.inf):
        eps = checks.positive_float("eps", eps)
    shape, modulation_shape = x.shape, gate.shape  # (each .shape makes a new torch.Size)
    B, N, D = shape
    if D == 0:
        raise ArgumentError(f"x: the last dimension (D) must be positive, got shape "
                            f"{tuple(shape)}")
    if y.shape != shape:
        raise ArgumentError(f"y: expected the shape of x {tuple(shape)}, got {tuple(y.shape)}")
    if len(modulation_shape) not in (2, 3) or modulation_shape[0] != B or (
            modulation_shape[-1] != D) or (len(modulation_shape) == 3 and modulation_shape[1] != N):
        raise ArgumentError(f"gate: expected shape {(B, D)} or {(B, N, D)} for x of shape "
                            f"{tuple(shape)}, got {tuple(modulation_shape)}")
    if not (shift.shape == modulation_shape == scale.shape):
        name, t = ("shift", shift) if shift.shape != modulation_shape else ("scale", scale)
        raise ArgumentError(f"{name}: expected the shape of gate {tuple(modulation_shape)}, "
                            f"got {tuple(t.shape)}")
    dtype = x.dtype
    if not (y.dtype is gate.dtype is shift.dtype is scale.dtype is dtype) or checks.any_autocast():
        for name, t in (("y", y), ("gate", gate), ("shift", shift), ("scale", scale)):
            checks.float_dtype(name, t)
        tensors = (x, y, gate, shift, scale)
        dtype = checks.compute_dtype(SPEC.autocast, tensors)
        x, y, gate, shift, scale = (checks.cast(t, dtype) for t in tensors)
    grad = needs_grad(x, y, gate, shift, scale)
    impl = OP.resolve(backend, x.device, dtype, D, grad)
    return OP.apply(impl, x.contiguous(), y.contiguous(), gate, shift, scale, eps, grad=grad)
