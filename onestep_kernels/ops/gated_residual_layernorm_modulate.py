"""gated_residual_layernorm_modulate: a DiT block's gated residual and the next modulated
LayerNorm in one pass over each row.

    residual = x + gate * y
    out      = LayerNorm(residual) * (1 + scale) + shift          (no affine, eps added to var)

x, y are (B, N, D); gate, shift, scale are all (B, D) per-sample or all (B, N, D) per-token.
Returns (residual, out); both carry gradients. Arithmetic in fp32 (the LayerNorm sees the fp32
residual, before its rounding to the output dtype); outputs in x's dtype.

The op's whole story lives here: reference, Triton kernels and launchers, native launchers,
backend records, the inner layer, torch.library registration and the public entry point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks, dispatch, native, tuning
from ..dispatch import Backend
from ..triton_compat import direct, tl, triton, triton_op, wrap_triton
from . import layernorm_core as core
from .common import (add_up_partials, bn_strides, cdiv, eager_apply, modulation_strides,
                     needs_grad, run_on)

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


def _triton_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, per_token,
                launch=direct):
    B, N, D = x.shape
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


def _cpu_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, per_token):
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
            int(per_token), native.dtype_code(x)))


def _cuda_fwd(x, *args):
    native.run_cuda("gated_residual_layernorm_modulate_fwd", _fwd_params(x, *args), x)


def _torch_bwd(dres, dout, x, y, gate, scale, stats, dx, dy, dmod, per_token):
    """The backward in PyTorch ops, in launcher form (the cuda backend's backward where
    Triton is missing)."""
    f32 = torch.float32
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
# Backends (see onestep_kernels.dispatch)
# ---------------------------------------------------------------------------------------------

OP = dispatch.Op("gated_residual_layernorm_modulate", [
    Backend("triton", "triton", ("cuda",), forward=_triton_fwd, backward=_triton_bwd,
            max_width=MAX_TRITON_D, summary="a row per program, in registers"),
    Backend("cuda", "cuda_library", ("cuda",), forward=_cuda_fwd,
            backward_from=("triton", "reference"), summary="forward only in CUDA C++"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd, backward=_cpu_bwd,
            summary="OpenMP over rows, AVX2 or portable"),
    # The backward launcher here serves the cuda backend where Triton is missing; the
    # reference backend itself is differentiated by autograd.
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=reference, backward=_torch_bwd, summary="PyTorch ops"),
])


# ---------------------------------------------------------------------------------------------
# The inner layer (no validation)
# ---------------------------------------------------------------------------------------------


def _forward(backend: Backend, x, y, gate, shift, scale, eps, keep_stats=True):
    B, N, _ = x.shape
    res, out = torch.empty_like(x), torch.empty_like(x)  # x is contiguous here
    # The rows' means then rstds, for the backward (one flat buffer: ~0.5 us less to make
    # than a (2, B, N) tensor); inference needs none.
    stats = x.new_empty(2 * B * N, dtype=torch.float32) if keep_stats else None
    if B * N > 0:
        run_on(x, backend.forward, x, y, gate, shift, scale, res, out, stats, eps)
    return res, out, stats


def _backward(backend: Backend, dres, dout, x, y, gate, scale, stats):
    """(dx, dy, dmod): dmod stacks the gradients of gate, shift and scale, (3, *gate.shape)
    (one buffer, one reduction of the per-sample partial sums). The backward reads x and y,
    not the rounded residual: it rebuilds the fp32 residual that the statistics describe."""
    dx, dy = torch.empty_like(x), torch.empty_like(x)
    dmod = x.new_empty((3, *gate.shape))
    launcher = OP.backward_launcher(backend, x.device, x.dtype, x.shape[-1])
    run_on(x, launcher, dres.contiguous(), dout.contiguous(), x, y, gate, scale, stats, dx, dy,
           dmod, gate.dim() == 3)
    return dx, dy, dmod


class _GatedResidualLayerNormModulate(torch.autograd.Function):
    """The eager path with gradients: the launchers called directly."""

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps, backend):
        res, out, stats = _forward(backend, x, y, gate, shift, scale, eps)
        ctx.save_for_backward(x, y, gate, scale, stats)
        ctx.backend = backend
        return res, out

    @staticmethod
    def backward(ctx, dres, dout):
        x, y, gate, scale, stats = ctx.saved_tensors
        dx, dy, dmod = _backward(ctx.backend, dres, dout, x, y, gate, scale, stats)
        return dx, dy, *dmod.unbind(0), None, None


_apply_with_grad = eager_apply(_GatedResidualLayerNormModulate, tensors=5)


def apply(backend: Backend, x, y, gate, shift, scale, eps,
          grad: bool | None = None) -> tuple[Tensor, Tensor]:
    """The op on a resolved backend, for validated arguments (one dtype and device, x and y
    contiguous); `grad`: whether the call records gradients, if the caller knows."""
    if backend.is_expression:
        return backend.expression(x, y, gate, shift, scale, eps)
    if torch.compiler.is_compiling():
        if backend.runtime == "triton" and x.is_cuda:  # inductor launches the kernels itself
            res, out, _ = gated_residual_layernorm_modulate_triton(x, y, gate, shift, scale, eps)
        else:
            res, out, _ = gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps,
                                                                backend.name)
        return res, out
    if needs_grad(x, y, gate, shift, scale) if grad is None else grad:
        return _apply_with_grad(x, y, gate, shift, scale, eps, backend)
    res, out, _ = _forward(backend, x, y, gate, shift, scale, eps, keep_stats=False)
    return res, out


# ---------------------------------------------------------------------------------------------
# torch.library registration (what torch.compile traces)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("onestep::gated_residual_layernorm_modulate_fwd", mutates_args=())
def gated_residual_layernorm_modulate_fwd(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor,
                                          scale: Tensor, eps: float, backend: str
                                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (residual, out, stats); stats is fp32 (2 B N,), the rows' means then their rstds,
    for the backward."""
    return _forward(OP[backend], x, y, gate, shift, scale, eps)


@gated_residual_layernorm_modulate_fwd.register_fake
def _(x, y, gate, shift, scale, eps, backend):
    B, N, D = x.shape
    return (x.new_empty((B, N, D)), x.new_empty((B, N, D)),
            x.new_empty(2 * B * N, dtype=torch.float32))


@torch.library.custom_op("onestep::gated_residual_layernorm_modulate_bwd", mutates_args=())
def gated_residual_layernorm_modulate_bwd(dres: Tensor, dout: Tensor, x: Tensor, y: Tensor,
                                          gate: Tensor, scale: Tensor, stats: Tensor,
                                          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dy, dmod) as `backend`'s backward computes them; dmod is
    (3, *gate.shape): the gradients of gate, shift and scale."""
    return _backward(OP[backend], dres, dout, x, y, gate, scale, stats)


@gated_residual_layernorm_modulate_bwd.register_fake
def _(dres, dout, x, y, gate, scale, stats, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((3, *gate.shape))


def _setup_context(ctx, inputs, output):
    x, y, gate, _shift, scale, _eps, backend = inputs
    _res, _out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, y, gate, scale, stats)
    ctx.backend = backend


def _backward_op(ctx, dres, dout, _dstats):
    x, y, gate, scale, stats = ctx.saved_tensors
    dx, dy, dmod = gated_residual_layernorm_modulate_bwd(
        dres, dout, x, y, gate, scale, stats, ctx.backend)
    return dx, dy, *dmod.unbind(0), None, None


gated_residual_layernorm_modulate_fwd.register_autograd(_backward_op,
                                                        setup_context=_setup_context)


# The Triton backend as triton_ops: under torch.compile on a GPU, inductor sees the kernels
# (wrap_triton) and launches them from its generated code.


@triton_op("onestep::gated_residual_layernorm_modulate_triton", mutates_args=())
def gated_residual_layernorm_modulate_triton(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor,
                                             scale: Tensor, eps: float
                                             ) -> tuple[Tensor, Tensor, Tensor]:
    B, N, D = x.shape
    res = x.new_empty((B, N, D))
    out = x.new_empty((B, N, D))
    stats = x.new_empty(2 * B * N, dtype=torch.float32)
    if B * N > 0:
        _triton_fwd(x, y, gate, shift, scale, res, out, stats, eps, launch=wrap_triton)
    return res, out, stats


@triton_op("onestep::gated_residual_layernorm_modulate_triton_bwd", mutates_args=())
def gated_residual_layernorm_modulate_triton_bwd(
        dres: Tensor, dout: Tensor, x: Tensor, y: Tensor, gate: Tensor, scale: Tensor,
        stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dy, dmod), as gated_residual_layernorm_modulate_bwd."""
    dx = x.new_empty(x.shape)
    dy = x.new_empty(x.shape)
    dmod = x.new_empty((3, *gate.shape))
    _triton_bwd(dres.contiguous(), dout.contiguous(), x, y, gate, scale, stats, dx, dy, dmod,
                gate.dim() == 3, launch=wrap_triton)
    return dx, dy, dmod


def _setup_triton_context(ctx, inputs, output):
    x, y, gate, _shift, scale, _eps = inputs
    _res, _out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, y, gate, scale, stats)


def _backward_triton_op(ctx, dres, dout, _dstats):
    x, y, gate, scale, stats = ctx.saved_tensors
    dx, dy, dmod = gated_residual_layernorm_modulate_triton_bwd(dres, dout, x, y, gate, scale,
                                                                stats)
    return dx, dy, *dmod.unbind(0), None


gated_residual_layernorm_modulate_triton.register_autograd(_backward_triton_op,
                                                           setup_context=_setup_triton_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


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
    # comparison (and float_dtype where it fails)
    checks.tensor("x", x, (3,))
    checks.unit_stride_rows("y", y)
    checks.unit_stride_rows("gate", gate)
    checks.unit_stride_rows("shift", shift)
    checks.unit_stride_rows("scale", scale)
    device = x.device
    if not (y.device == gate.device == shift.device == scale.device == device):
        for name, t in (("y", y), ("gate", gate), ("shift", shift), ("scale", scale)):
            checks.same_device(name, t, x, "x")
    if not (isinstance(eps, float) and 0.0 < eps < math.inf):
        eps = checks.positive_float("eps", eps)
    shape, modulation_shape = x.shape, gate.shape  # (each .shape makes a new torch.Size)
    B, N, D = shape
    if D == 0:
        raise ValueError(f"x: the last dimension (D) must be positive, got shape {tuple(shape)}")
    if y.shape != shape:
        raise ValueError(f"y: expected the shape of x {tuple(shape)}, got {tuple(y.shape)}")
    if len(modulation_shape) not in (2, 3) or modulation_shape[0] != B or (
            modulation_shape[-1] != D) or (len(modulation_shape) == 3 and modulation_shape[1] != N):
        raise ValueError(f"gate: expected shape {(B, D)} or {(B, N, D)} for x of shape "
                         f"{tuple(shape)}, got {tuple(modulation_shape)}")
    if not (shift.shape == modulation_shape == scale.shape):
        name, t = ("shift", shift) if shift.shape != modulation_shape else ("scale", scale)
        raise ValueError(f"{name}: expected the shape of gate {tuple(modulation_shape)}, "
                         f"got {tuple(t.shape)}")
    dtype = x.dtype
    if not (y.dtype is gate.dtype is shift.dtype is scale.dtype is dtype) or checks.any_autocast():
        for name, t in (("y", y), ("gate", gate), ("shift", shift), ("scale", scale)):
            checks.float_dtype(name, t)
        tensors = (x, y, gate, shift, scale)
        dtype = checks.compute_dtype(checks.LAYER_NORM, tensors)
        x, y, gate, shift, scale = (checks.cast(t, dtype) for t in tensors)
    grad = needs_grad(x, y, gate, shift, scale)
    impl = OP.resolve(backend, device, dtype, D, grad)
    return apply(impl, x.contiguous(), y.contiguous(), gate, shift, scale, eps, grad)
