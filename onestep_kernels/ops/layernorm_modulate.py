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
from .common import add_up_partials, bn_strides, cdiv, needs_grad

# The kernels call the shared jit functions by bare name: inductor copies a user kernel's
# source with the jit functions it names, and cannot follow a module attribute (core.x).
from .layernorm_core import layernorm_input_grad, modulate, normalised, row_statistics

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

# The Triton kernels keep a whole row in registers; past 4096 the backward spills on sm_80/90
# (the compile check in onestep_kernels.aot finds it), so wider rows go to another backend.
MAX_TRITON_D = 4096
# Rows of one sample handled by one backward program; also the granularity of the per-sample
# partial sums (fixed, so results do not depend on the GPU).
BWD_ROWS_PER_PROGRAM = 16


@triton.jit
def _layernorm_modulate_fwd_kernel(
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
def _layernorm_modulate_bwd_loads(DY, X, SCALE, STATS, n_rows, b, n, N, D, x_sb, x_sn,
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
def _layernorm_modulate_bwd_kernel(
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
        dy_next, x_next, scale_next, mean_next, rstd_next = _layernorm_modulate_bwd_loads(
            DY, X, SCALE, STATS, n_rows, b, n_start, N, D, x_sb, x_sn, scale_sb, scale_sn,
            cols, tl.where(n_start < n_end, D, 0))
    for n in range(n_start, n_end):
        row = b * N + n
        if PREFETCH:
            dy, x, scale, mean, rstd = dy_next, x_next, scale_next, mean_next, rstd_next
            dy_next, x_next, scale_next, mean_next, rstd_next = _layernorm_modulate_bwd_loads(
                DY, X, SCALE, STATS, n_rows, b, n + 1, N, D, x_sb, x_sn, scale_sb, scale_sn,
                cols, tl.where(n + 1 < n_end, D, 0))
        else:
            dy, x, scale, mean, rstd = _layernorm_modulate_bwd_loads(
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
MAX_PER_THREAD = 16


_block = core.row_block


def _warps(block_d: int, element_bytes: int) -> tuple[int, ...]:
    return core.row_warps(block_d, element_bytes, MAX_PER_THREAD)


def triton_configs():
    """Every configuration the launchers below can pick, for onestep_kernels.aot."""
    return core.row_kernel_configs("layernorm_modulate", _layernorm_modulate_fwd_kernel,
                                   _layernorm_modulate_bwd_kernel, MAX_TRITON_D, MAX_PER_THREAD,
                                   BWD_ROWS_PER_PROGRAM, ("DMOD",))


def _triton_fwd(x, shift, scale, out, stats, eps, launch=direct):
    B, N, D = x.shape
    block_d = _block(D)
    kernel, options = tuning.select(_layernorm_modulate_fwd_kernel,
                                    _warps(block_d, x.element_size()), ("D",))
    launch(kernel)[(B * N,)](
        x, shift, scale, out, core.stats_or_placeholder(stats, x.device), B * N, N, D,
        *bn_strides(x), *bn_strides(shift), *bn_strides(scale), eps, BLOCK_D=block_d,
        KEEP_STATS=stats is not None, **options)


def _triton_bwd(dy, x, scale, stats, dx, dmod, eps, launch=direct):
    B, N, D = x.shape
    per_token = scale.dim() == 3
    block_d = _block(D)
    kernel, options = tuning.select_variants(
        _layernorm_modulate_bwd_kernel,
        core.bwd_options(block_d, x.element_size(), MAX_PER_THREAD), ("D",))
    chunks = cdiv(N, BWD_ROWS_PER_PROGRAM)
    # Per-sample: the programs' partial sums, added up into dmod after the launch.
    grads = dmod if per_token else x.new_empty((2, B, chunks, D), dtype=torch.float32)
    launch(kernel)[(B, chunks)](
        dy, x, scale, stats, B * N, dx, grads, grads.stride(0), N, D, *bn_strides(x),
        *bn_strides(scale), ROWS=BWD_ROWS_PER_PROGRAM, BLOCK_D=block_d,
        PER_TOKEN=per_token, **options)
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


def _bwd_params(dy, x, scale, stats, dx, dmod, eps):
    B, N, D = x.shape
    mean = stats.data_ptr()
    x_sb, x_sn, _ = x.stride()
    scale_sb, scale_sn = bn_strides(scale)
    dshift = dmod.data_ptr()  # dmod: (2, *scale.shape), contiguous
    return native.positional_params(
        "LayerNormModulateBwdParams",
        "dy x scale mean rstd dx dshift dscale B N D x_sb x_sn scale_sb scale_sn per_token "
        "dtype")(dy.data_ptr(), x.data_ptr(), scale.data_ptr(), mean, mean + 4 * B * N,
                 dx.data_ptr(), dshift, dshift + dmod.stride(0) * dmod.element_size(), B, N, D,
                 x_sb, x_sn, scale_sb, scale_sn, int(scale.dim() == 3), native.dtype_code(x))


def _cpu_fwd(*args):
    native.run_cpu("layernorm_modulate_fwd", _fwd_params(*args))


def _cpu_bwd(*args):
    native.run_cpu("layernorm_modulate_bwd", _bwd_params(*args))


def _cuda_fwd(x, *args):
    native.run_cuda("layernorm_modulate_fwd", _fwd_params(x, *args), x)


def _cuda_bwd(dy, x, *args):
    native.run_cuda("layernorm_modulate_bwd", _bwd_params(dy, x, *args), x)


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
            max_width=MAX_TRITON_D, summary="a row per program, in registers"),
    Backend("cuda", "cuda_library", ("cuda",), forward=_cuda_fwd, backward=_cuda_bwd,
            summary="a thread block per row, Welford merge"),
    Backend("cpu", "cpu_library", ("cpu",), forward=_cpu_fwd, backward=_cpu_bwd,
            summary="OpenMP over rows, AVX2 or portable"),
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=reference, summary="F.layer_norm and PyTorch ops"),
], default_order={"cpu": ("cpu", "reference"), "sm_90": ("triton", "reference", "cuda")},
    triton_configs=triton_configs)


# The forward into a caller's buffer, as torch.compile traces it (inference: no autograd).


@torch.library.custom_op("onestep::layernorm_modulate_out", mutates_args=("out",))
def layernorm_modulate_out(x: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str,
                           out: Tensor) -> None:
    OP.forward(OP[backend], x, shift, scale, eps, outputs=(out, None))


@layernorm_modulate_out.register_fake
def _(x, shift, scale, eps, backend, out):
    tag_once()
    return None


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
