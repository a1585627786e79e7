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
from .common import add_up_partials, bn_strides, cdiv, modulation_strides, needs_grad

# The kernels call the shared jit functions by bare name: inductor copies a user kernel's
# source with the jit functions it names, and cannot follow a module attribute (core.x).
from .layernorm_core import layernorm_input_grad, modulate, normalised, row_statistics

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

# A row lives in registers. The backward keeps about eleven row-sized values live and spilled
# on sm_80/sm_90 at BLOCK_D=4096 with 8 or 16 warps (onestep_kernels.aot), so wider rows go to
# another backend. DiT widths (384..1152) are well inside.
MAX_TRITON_D = 2048
BWD_ROWS_PER_PROGRAM = 16


@triton.jit
def _gated_residual_layernorm_modulate_fwd_kernel(
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
def _gated_residual_layernorm_modulate_bwd_loads(DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows,
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
def _gated_residual_layernorm_modulate_bwd_kernel(
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
         rstd_next) = _gated_residual_layernorm_modulate_bwd_loads(
            DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows, b, n_start, N, D, gate_sb, gate_sn,
            scale_sb, scale_sn, cols, tl.where(n_start < n_end, D, 0))
    for n in range(n_start, n_end):
        row = b * N + n
        if PREFETCH:
            dres, dout, x, y, gate, scale, mean, rstd = (
                dres_next, dout_next, x_next, y_next, gate_next, scale_next, mean_next,
                rstd_next)
            (dres_next, dout_next, x_next, y_next, gate_next, scale_next, mean_next,
             rstd_next) = _gated_residual_layernorm_modulate_bwd_loads(
                DRES, DOUT, X, Y, GATE, SCALE, STATS, n_rows, b, n + 1, N, D, gate_sb,
                gate_sn, scale_sb, scale_sn, cols, tl.where(n + 1 < n_end, D, 0))
        else:
            dres, dout, x, y, gate, scale, mean, rstd = (
                _gated_residual_layernorm_modulate_bwd_loads(
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
MAX_PER_THREAD = 8


_block = core.row_block


def _warps(block_d: int, element_bytes: int) -> tuple[int, ...]:
    return core.row_warps(block_d, element_bytes, MAX_PER_THREAD)


def triton_configs():
    """Every configuration the launchers below can pick, for onestep_kernels.aot."""
    return core.row_kernel_configs("gated_residual_layernorm_modulate",
                                   _gated_residual_layernorm_modulate_fwd_kernel,
                                   _gated_residual_layernorm_modulate_bwd_kernel, MAX_TRITON_D,
                                   MAX_PER_THREAD, BWD_ROWS_PER_PROGRAM, ("DMOD",))


def _triton_fwd(x, y, gate, shift, scale, res, out, stats, eps, launch=direct):
    B, N, D = x.shape
    block_d = _block(D)
    kernel, options = tuning.select(_gated_residual_layernorm_modulate_fwd_kernel,
                                    _warps(block_d, x.element_size()), ("D",))
    launch(kernel)[(B * N,)](
        x, y, gate, shift, scale, res, out, core.stats_or_placeholder(stats, x.device), B * N,
        N, D, *modulation_strides(gate, shift, scale), eps, BLOCK_D=block_d,
        KEEP_STATS=stats is not None, **options)


def _triton_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, eps, launch=direct):
    B, N, D = x.shape
    per_token = gate.dim() == 3
    block_d = _block(D)
    kernel, options = tuning.select_variants(
        _gated_residual_layernorm_modulate_bwd_kernel,
        core.bwd_options(block_d, x.element_size(), MAX_PER_THREAD), ("D",))
    chunks = cdiv(N, BWD_ROWS_PER_PROGRAM)
    # Per-sample: the programs' partial sums, added up into dmod after the launch.
    grads = dmod if per_token else x.new_empty((3, B, chunks, D), dtype=torch.float32)
    launch(kernel)[(B, chunks)](
        dres, dout, x, y, gate, scale, stats, B * N, dx, dy, grads, grads.stride(0), N, D,
        *bn_strides(gate), *bn_strides(scale), ROWS=BWD_ROWS_PER_PROGRAM, BLOCK_D=block_d,
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


def _cpu_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, eps):
    B, N, D = x.shape
    mean = stats.data_ptr()
    g_sb, g_sn = bn_strides(gate)
    sc_sb, sc_sn = bn_strides(scale)
    dgate = dmod.data_ptr()  # dmod: (3, *gate.shape), contiguous
    plane = dmod.stride(0) * dmod.element_size()
    native.run_cpu("gated_residual_layernorm_modulate_bwd", native.positional_params(
        "GatedResidualBwdParams",
        "dres dout x y gate scale mean rstd dx dy dgate dshift dscale B N D gate_sb gate_sn "
        "scale_sb scale_sn per_token dtype")(
            dres.data_ptr(), dout.data_ptr(), x.data_ptr(), y.data_ptr(), gate.data_ptr(),
            scale.data_ptr(), mean, mean + 4 * B * N, dx.data_ptr(), dy.data_ptr(), dgate,
            dgate + plane, dgate + 2 * plane, B, N, D, g_sb, g_sn, sc_sb, sc_sn,
            int(gate.dim() == 3), native.dtype_code(x)))


def _cuda_fwd(x, *args):
    native.run_cuda("gated_residual_layernorm_modulate_fwd", _fwd_params(x, *args), x)


def _torch_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, eps):
    """The backward in PyTorch ops, in launcher form (the cuda backend's backward where
    Triton is missing or cannot take the width)."""
    f32 = torch.float32
    per_token = gate.dim() == 3
    g3, s3 = (gate.to(f32), scale.to(f32)) if per_token else (gate[:, None].to(f32),
                                                              scale[:, None].to(f32))
    mean, rstd = stats.view(2, *x.shape[:2])
    xhat = (x.to(f32) + g3 * y.to(f32) - mean[..., None]) * rstd[..., None]
    g = dout.to(f32) * (1 + s3)
    dln = rstd[..., None] * (g - g.mean(-1, keepdim=True)
                             - xhat * (g * xhat).mean(-1, keepdim=True))
    dr = dres.to(f32) + dln
    mod_grads = (dr * y.to(f32), dout.to(f32), dout.to(f32) * xhat)
    if not per_token:
        mod_grads = tuple(t.sum(1) for t in mod_grads)
    dx.copy_(dr)
    dy.copy_(dr * g3)
    dmod.copy_(torch.stack(mod_grads))


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
            max_width=MAX_TRITON_D, summary="a row per program, in registers"),
    Backend("cuda", "cuda_library", ("cuda",), forward=_cuda_fwd,
            backward_from=("triton", "reference"), summary="forward only in CUDA C++"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd, backward=_cpu_bwd,
            summary="OpenMP over rows, AVX2 or portable"),
    # The backward launcher here serves the cuda backend where Triton cannot; the reference
    # backend itself is differentiated by autograd.
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=reference, backward=_torch_bwd, summary="PyTorch ops"),
], default_order={"cpu": ("cpu", "reference"), "sm_90": ("triton", "cuda", "reference")},
    triton_configs=triton_configs)


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
