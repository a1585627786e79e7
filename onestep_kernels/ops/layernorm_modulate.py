"""layernorm_modulate: LayerNorm of x over its last dimension (no affine), then adaLN modulation.

    out = (x - mean) / sqrt(var + eps) * (1 + scale) + shift

x is (B, N, D); shift and scale are (B, D) (one vector per sample, as in DiT) or (B, N, D)
(one per token). Statistics and arithmetic in fp32; the output has x's dtype. A row of x that
contains NaN or inf gives NaN in that row of the output and leaves other rows alone.

This file holds the op's whole story: the reference, the Triton kernels and launchers, the
native (CPU C++ / CUDA C++) launchers, the backend records with the op's spec (from which
onestep_kernels.op_spec builds the eager paths and the torch.library registration), and the
public entry point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks, dispatch, native, tuning
from ..compile_cache import tag_once
from ..dispatch import Backend
from ..errors import ArgumentError, ArgumentTypeError
from ..op_spec import Op, OpSpec
from ..triton_compat import direct, tl, triton
from . import layernorm_core as core
from . import padded_rows
from .common import add_up_partials, bn_strides, needs_grad

# The kernels call the shared jit functions by bare name: inductor copies a user kernel's
# source with the jit functions it names, and cannot follow a module attribute (core.x).
from .layernorm_core import chunk_columns, chunk_merge, modulate, modulation_chunk

# ---------------------------------------------------------------------------------------------
# Reference (the oracle, and the `reference` backend)
# ---------------------------------------------------------------------------------------------


def reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """The op in plain PyTorch; computes in fp32 (fp64 if given fp64) and returns x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    if shift.dim() == 2:
        shift, scale = shift[:, None, :], scale[:, None, :]
    normed = torch.nn.functional.layer_norm(x.to(compute), x.shape[-1:], eps=eps)
    return (normed * (1 + scale.to(compute)) + shift.to(compute)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

# Program (b, c) handles rows n in [c * ROWS, (c + 1) * ROWS) of sample b as one (ROWS, CHUNK)
# tile, walking the row in chunks (onestep_kernels.ops.layernorm_core says why). Any width.


@triton.jit
def _layernorm_modulate_fwd_kernel(
    X, SHIFT, SCALE, OUT, STATS, n_rows,
    N, D, x_sb, x_sn, shift_sb, shift_sn, scale_sb, scale_sn, eps,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, PER_TOKEN: tl.constexpr,
    KEEP_STATS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * ROWS
    n = n0 + tl.arange(0, ROWS)
    row_ok = n < N
    n = n.to(tl.int64)
    # 64-bit offsets for the program's tile, 32-bit ones inside it (the launcher keeps
    # ROWS x x_sn within int32)
    x_rows = X + b * x_sb + n0.to(tl.int64) * x_sn + tl.arange(0, ROWS)[:, None] * x_sn
    first = tl.zeros((ROWS,), dtype=tl.float32)  # the first chunk's mean (chunk_merge)
    mean = tl.zeros((ROWS,), dtype=tl.float32)
    m2 = tl.zeros((ROWS,), dtype=tl.float32)
    for k in range(0, D, CHUNK):
        cols, col_ok = chunk_columns(k, D, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        first, mean, m2 = chunk_merge(first, mean, m2, x, mask, k, D, CHUNK)
    mean += first
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    rows = b * N + n
    out_rows = OUT + (b * N + n0) * D + tl.arange(0, ROWS)[:, None] * D
    for k in range(0, D, CHUNK):
        cols, col_ok = chunk_columns(k, D, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        shift = modulation_chunk(SHIFT, b, n, cols, mask, col_ok, shift_sb, shift_sn, PER_TOKEN)
        scale = modulation_chunk(SCALE, b, n, cols, mask, col_ok, scale_sb, scale_sn, PER_TOKEN)
        out = modulate((x - mean[:, None]) * rstd[:, None], shift, scale)
        tl.store(out_rows + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    if KEEP_STATS:  # for a backward; STATS: the rows' means, then their rstds (2 B N)
        tl.store(STATS + rows, mean, mask=row_ok)
        tl.store(STATS + n_rows + rows, rstd, mask=row_ok)


@triton.jit
def _layernorm_modulate_bwd_kernel(
    DY, X, SCALE, STATS, n_rows, DX, DMOD, plane,
    N, D, x_sb, x_sn, scale_sb, scale_sn,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # Two walks over the chunks: the first sums g = dy (1 + scale) and g xhat along each row
    # (the input gradient needs both row sums) and writes the modulation's gradients, which
    # need neither; the second writes dx. DMOD holds the shift gradient and, `plane` elements
    # further, the scale gradient: per-token their rows ((2, B, N, D)); per-sample the
    # program's column sums over its rows at [b, c] of (2, B, programs, D) fp32, which the
    # launcher adds up (no atomics: deterministic).
    DSHIFT = DMOD
    DSCALE = DMOD + plane
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n = c * ROWS + tl.arange(0, ROWS)
    row_ok = n < N
    n = n.to(tl.int64)
    rows = b * N + n
    mean = tl.load(STATS + rows, mask=row_ok, other=0.0)[:, None]
    rstd = tl.load(STATS + n_rows + rows, mask=row_ok, other=0.0)[:, None]
    # 64-bit offsets for the program's tile, 32-bit ones inside it (the launcher keeps
    # ROWS x x_sn within int32)
    x_rows = (X + b * x_sb + (c * ROWS).to(tl.int64) * x_sn
              + tl.arange(0, ROWS)[:, None] * x_sn)
    tile = (b * N + c * ROWS) * D
    DY += tile
    DX += tile
    if PER_TOKEN:
        DSHIFT += tile
        DSCALE += tile
    row_offsets = tl.arange(0, ROWS)[:, None] * D
    part = (b * tl.num_programs(1) + c) * D
    sum_g = tl.zeros((ROWS,), dtype=tl.float32)
    sum_gx = tl.zeros((ROWS,), dtype=tl.float32)
    for k in range(0, D, CHUNK):
        cols, col_ok = chunk_columns(k, D, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = modulation_chunk(SCALE, b, n, cols, mask, col_ok, scale_sb, scale_sn, PER_TOKEN)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * (1.0 + scale)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xhat, axis=1)
        if PER_TOKEN:
            tl.store(DSHIFT + row_offsets + cols[None, :], dy.to(DSHIFT.dtype.element_ty),
                     mask=mask)
            tl.store(DSCALE + row_offsets + cols[None, :],
                     (dy * xhat).to(DSCALE.dtype.element_ty), mask=mask)
        else:
            tl.store(DSHIFT + part + cols, tl.sum(dy, axis=0), mask=col_ok)
            tl.store(DSCALE + part + cols, tl.sum(dy * xhat, axis=0), mask=col_ok)
    mean_g = (sum_g / D)[:, None]
    mean_gx = (sum_gx / D)[:, None]
    for k in range(0, D, CHUNK):
        cols, col_ok = chunk_columns(k, D, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = modulation_chunk(SCALE, b, n, cols, mask, col_ok, scale_sb, scale_sn, PER_TOKEN)
        xhat = (x - mean) * rstd
        dx = rstd * (dy * (1.0 + scale) - mean_g - xhat * mean_gx)
        tl.store(DX + row_offsets + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# Per-sample, per program and chunk: the forward loads shift and scale; the backward loads
# scale in each of its two walks and stores two partial sums.
CHUNK_VECTORS = (2, 4)


def triton_configs():
    """Every configuration the launchers below can pick (and the triton_padded backend's), for
    onestep_kernels.aot."""
    yield from core.chunk_kernel_configs("layernorm_modulate", _layernorm_modulate_fwd_kernel,
                                         _layernorm_modulate_bwd_kernel, ("DMOD",),
                                         CHUNK_VECTORS)
    yield from padded_rows.layernorm_configs()


def triton_launches(width: int):
    """What the launchers below pick at this width, for onestep_kernels.aot's checks."""
    return core.chunk_launches("layernorm_modulate", _layernorm_modulate_fwd_kernel,
                               _layernorm_modulate_bwd_kernel, ("DMOD",), CHUNK_VECTORS, width)


def _triton_fwd(x, shift, scale, out, stats, eps, launch=direct):
    B, N, D = x.shape
    chunk = core.chunk_for(D)
    x = core.within_tile_offsets(x, core.fwd_rows(chunk))
    kernel, options = tuning.select(_layernorm_modulate_fwd_kernel,
                                    core.fwd_warps(chunk, x.element_size()), ("D",))
    launch(kernel)[core.fwd_grid(B, N, chunk)](
        x, shift, scale, out, core.stats_or_placeholder(stats, x.device), B * N, N, D,
        *bn_strides(x), *bn_strides(shift), *bn_strides(scale), eps, ROWS=core.fwd_rows(chunk),
        CHUNK=chunk, PER_TOKEN=shift.dim() == 3, KEEP_STATS=stats is not None, **options)


def _triton_bwd(dy, x, scale, stats, dx, dmod, eps, launch=direct):
    B, N, D = x.shape
    per_token = scale.dim() == 3
    chunk = core.chunk_for(D)
    x = core.within_tile_offsets(x, core.BWD_ROWS)
    kernel, options = tuning.select(_layernorm_modulate_bwd_kernel,
                                    core.bwd_warps(chunk, x.element_size()), ("D",))
    grid = core.bwd_grid(B, N)
    # Per-sample: the programs' partial sums, added up into dmod after the launch.
    grads = dmod if per_token else x.new_empty((2, *grid, D), dtype=torch.float32)
    launch(kernel)[grid](
        dy, x, scale, stats, B * N, dx, grads, grads.stride(0), N, D, *bn_strides(x),
        *bn_strides(scale), ROWS=core.BWD_ROWS, CHUNK=chunk, PER_TOKEN=per_token, **options)
    if not per_token:
        add_up_partials(grads, 2, dmod, in_graph=launch is not direct)


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/layernorm_modulate.cpp, csrc/cuda/layernorm_modulate.cu)
# ---------------------------------------------------------------------------------------------


def _fwd_params(x, shift, scale, out, stats, eps):
    B, N, D = x.shape
    mean = rstd = 0  # no statistics kept (inference)
    if stats is not None:  # 2 B N floats: the rows' means, then their rstds
        mean = stats.data_ptr()
        rstd = mean + 4 * B * N
    x_sb, x_sn, _ = x.stride()
    shift_sb, shift_sn = bn_strides(shift)
    scale_sb, scale_sn = bn_strides(scale)
    return native.positional_params(
        "LayerNormModulateFwdParams",
        "x shift scale out mean rstd B N D x_sb x_sn shift_sb shift_sn scale_sb scale_sn eps "
        "dtype")(x.data_ptr(), shift.data_ptr(), scale.data_ptr(), out.data_ptr(), mean, rstd,
                 B, N, D, x_sb, x_sn, shift_sb, shift_sn, scale_sb, scale_sn, eps,
                 native.dtype_code(x))


def _bwd_params(dy, x, scale, stats, dx, dmod, eps, partials=0):
    B, N, D = x.shape
    mean = stats.data_ptr()
    x_sb, x_sn, _ = x.stride()
    scale_sb, scale_sn = bn_strides(scale)
    dshift = dmod.data_ptr()  # dmod: (2, *scale.shape), contiguous
    return native.positional_params(
        "LayerNormModulateBwdParams",
        "dy x scale mean rstd dx dshift dscale B N D x_sb x_sn scale_sb scale_sn partials "
        "per_token dtype")(dy.data_ptr(), x.data_ptr(), scale.data_ptr(), mean,
                           mean + 4 * B * N, dx.data_ptr(), dshift,
                           dshift + dmod.stride(0) * dmod.element_size(), B, N, D, x_sb, x_sn,
                           scale_sb, scale_sn, partials, int(scale.dim() == 3),
                           native.dtype_code(x))


def _cpu_fwd(*args):
    native.run_cpu("layernorm_modulate_fwd", _fwd_params(*args))


def _cpu_bwd(*args):
    native.run_cpu("layernorm_modulate_bwd", _bwd_params(*args))


def _cuda_fwd(x, *args):
    native.run_cuda("layernorm_modulate_fwd", _fwd_params(x, *args), x)


def _cuda_bwd(dy, x, scale, stats, dx, dmod, eps):
    workspace = native.cuda_partials(x, 2, scale.dim() == 3)
    native.run_cuda("layernorm_modulate_bwd", _bwd_params(
        dy, x, scale, stats, dx, dmod, eps, native.address(workspace)), x)


# ---------------------------------------------------------------------------------------------
# The spec and the backends (see onestep_kernels.op_spec and onestep_kernels.dispatch)
# ---------------------------------------------------------------------------------------------


def _allocate(backend, keep, x, shift, scale, eps):
    """out (x's layout where x is contiguous: empty_like costs half of new_empty(shape)), and
    for a backward the rows' means then rstds (one flat fp32 buffer: ~0.5 us less to make
    than a (2, B, N) tensor)."""
    B, N, D = x.shape
    out = torch.empty_like(x) if x.is_contiguous() else x.new_empty((B, N, D))
    return out, (x.new_empty(2 * B * N, dtype=torch.float32) if keep else None)


def _allocate_grads(x, scale, stats, eps):
    """dx, and dmod: the gradients of shift and scale stacked, (2, *scale.shape) (one buffer,
    one reduction of the per-sample partial sums)."""
    dx = torch.empty_like(x) if x.is_contiguous() else x.new_empty(x.shape)
    return dx, x.new_empty((2, *scale.shape))


def _example(sizes, device, dtype, generator):
    """DiT's first modulated LayerNorm: shift and scale are views of the adaLN output."""
    x = torch.randn(sizes.B, sizes.N, sizes.D, generator=generator, device=device).to(dtype)
    mods = torch.randn(sizes.B, 6 * sizes.D, generator=generator, device=device).to(dtype)
    shift, scale = mods.chunk(6, dim=1)[:2]
    return (x, shift, scale), {}


def _eager(x, shift, scale):
    """As a DiT writes it (per-sample modulation), in the inputs' dtype."""
    normed = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)
    return normed * (1 + scale[:, None]) + shift[:, None]


SPEC = OpSpec(
    "layernorm_modulate", inputs=("x", "shift", "scale"), params=(("eps", float),),
    outputs=("out", "stats"), allocate=_allocate, saved=("x", "scale", "stats"),
    grads=("dx", "dmod"), allocate_grads=_allocate_grads,
    input_grads=lambda dx, dmod: (dx, dmod[0], dmod[1]), empty_if=("x",),
    autocast=checks.LAYER_NORM, triton_op=True, memory_bound=True, example=_example,
    eager=_eager)

OP = Op(SPEC, [
    Backend("triton", "triton", ("cuda",), forward=_triton_fwd, backward=_triton_bwd,
            summary="rows of one sample per program, in exact chunks"),
    Backend("cuda", "cuda_library", ("cuda",), forward=_cuda_fwd, backward=_cuda_bwd,
            max_width=native.CUDA_MAX_WIDTH,
            summary="rows of one sample per block in 16-byte vectors, Chan merge"),
    Backend("triton_padded", "triton", ("cuda",), forward=padded_rows.layernorm_fwd,
            backward=padded_rows.layernorm_bwd, max_width=padded_rows.LAYERNORM_MAX_D,
            summary="before issue 31: a row per program padded to a power of two; kept to "
                    "time against"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd, backward=_cpu_bwd,
            summary="OpenMP over rows, AVX2 or portable"),
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=reference, summary="F.layer_norm and PyTorch ops"),
], default_order={"cpu": ("cpu", "reference"), "sm_90": ("triton", "reference", "cuda")},
    triton_configs=triton_configs, triton_launches=triton_launches)


# The forward into a caller's buffer, as torch.compile traces it (inference: no autograd).


@torch.library.custom_op("onestep::layernorm_modulate_out", mutates_args=("out",))
def layernorm_modulate_out(x: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str,
                           out: Tensor) -> None:
    OP.forward(OP[backend], x, shift, scale, eps, outputs=(out, None))


@layernorm_modulate_out.register_fake
def _(x, shift, scale, eps, backend, out):
    tag_once()


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@OP.public_entry
def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *,
                       backend: str | None = None, out: Tensor | None = None) -> Tensor:
    """LayerNorm(x) * (1 + scale) + shift, fused; see the module docstring.

    Args:
        x: (B, N, D) float32, float16, bfloat16 or float64 (float64 runs the reference); the
            last dimension must have stride 1 (other strides are read as they are).
        shift, scale: (B, D) per-sample or (B, N, D) per-token modulation, on x's device, same
            shape as each other, last dimension contiguous (views such as
            ``c.chunk(6, dim=1)`` are read in place). Mixed dtypes are promoted to a common
            one; under autocast the op follows F.layer_norm (float32 under CUDA autocast).
        eps: added to the variance.
        backend: one of the op's backends (onestep_kernels.dispatch); None picks the fastest
            that can take the call.
        out: optional contiguous (B, N, D) buffer of the result's dtype and x's device to
            write into and return; for inference (an error if gradients are needed). Reusing
            one buffer avoids the page faults of a fresh large allocation.
    """
    checks.tensor("x", x, (3,))
    checks.tensor("shift", shift, (2, 3))
    checks.tensor("scale", scale, (2, 3))
    if not (isinstance(eps, float) and 0.0 < eps < math.inf):
        eps = checks.positive_float("eps", eps)
    modulation_shape = shift.shape  # (each .shape makes a new torch.Size)
    B, N, D = x.shape
    if D == 0:
        raise ArgumentError(f"x: the last dimension (D) must be positive, got shape "
                            f"{tuple(x.shape)}")
    if modulation_shape[0] != B or modulation_shape[-1] != D or (
            len(modulation_shape) == 3 and modulation_shape[1] != N):
        raise ArgumentError(f"shift: expected shape {(B, D)} or {(B, N, D)} for x of shape "
                            f"{tuple(x.shape)}, got {tuple(modulation_shape)}")
    if scale.shape != modulation_shape:
        raise ArgumentError(f"scale: expected the shape of shift {tuple(modulation_shape)}, "
                            f"got {tuple(scale.shape)}")
    dtype = x.dtype
    if not (shift.dtype is scale.dtype is dtype) or checks.any_autocast():
        dtype = checks.compute_dtype(SPEC.autocast, (x, shift, scale))
        x, shift, scale = (checks.cast(t, dtype) for t in (x, shift, scale))
    grad = needs_grad(x, shift, scale)
    impl = OP.resolve(backend, x.device, dtype, D, grad)
    if out is None:
        return OP.apply(impl, x, shift, scale, eps, grad=grad)
    _check_out(out, x, shift, scale, grad)
    if impl.is_expression:
        return out.copy_(impl.expression(x, shift, scale, eps))
    if torch.compiler.is_compiling():
        layernorm_modulate_out(x, shift, scale, eps, impl.name, out)
    else:
        OP.forward(impl, x, shift, scale, eps, outputs=(out, None))
    return out


def _check_out(out, x: Tensor, shift: Tensor, scale: Tensor, grad: bool) -> None:
    if not isinstance(out, torch.Tensor):
        raise ArgumentTypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    checks.same_device("out", out, x, "x")
    if out.dtype != x.dtype:
        raise ArgumentTypeError(f"out: has dtype {out.dtype} but the result has {x.dtype}")
    if out.shape != x.shape or not out.is_contiguous():
        raise ArgumentError(f"out: expected a contiguous tensor of shape {tuple(x.shape)}, got "
                            f"shape {tuple(out.shape)} with strides {out.stride()}")
    if grad or (torch.is_grad_enabled() and out.requires_grad):
        raise ArgumentError("out: writing into a buffer does not record gradients; call "
                            "without out=, or under torch.no_grad()")
    if out.data_ptr() in (x.data_ptr(), shift.data_ptr(), scale.data_ptr()) and out.numel():
        raise ArgumentError("out: must not share memory with x, shift or scale")
