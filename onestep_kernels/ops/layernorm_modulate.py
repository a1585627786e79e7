"""layernorm_modulate: LayerNorm of x over its last dimension (no affine), then adaLN modulation.

    out = (x - mean) / sqrt(var + eps) * (1 + scale) + shift

x is (B, N, D); shift and scale are (B, D) (one vector per sample, as in DiT) or (B, N, D)
(one per token). Statistics and arithmetic in fp32; the output has x's dtype. A row of x that
contains NaN or inf gives NaN in that row of the output and leaves other rows alone.

This file holds the op's whole story: the reference, the Triton kernels and launchers, the
native (CPU C++ / CUDA C++) launchers, the torch.library registration with its fake
implementation and autograd, and the public entry point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks, dispatch, native
from ..triton_compat import tl, triton
from .common import bn_strides, interpreter_bf16_reason, launcher, on_device

# ---------------------------------------------------------------------------------------------
# Reference (the oracle, and the `torch` backend)
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
    X, SHIFT, SCALE, OUT, MEAN, RSTD,
    N, D, x_sb, x_sn, shift_sb, shift_sn, scale_sb, scale_sn, eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + b * x_sb + n * x_sn + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    diff = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
    shift = tl.load(SHIFT + b * shift_sb + n * shift_sn + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0).to(tl.float32)
    out = diff * rstd * (1.0 + scale) + shift
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layernorm_modulate_bwd_kernel(
    DY, X, SCALE, MEAN, RSTD, DX, DSHIFT, DSCALE,
    N, D, x_sb, x_sn, scale_sb, scale_sn,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # Program (b, c) handles rows n in [c * ROWS, (c + 1) * ROWS) of sample b. Per-token: it
    # writes dshift/dscale rows. Per-sample: it writes its partial sums to DSHIFT/DSCALE[b, c],
    # which the launcher adds up (no atomics, so the result is deterministic).
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_end = tl.minimum((c + 1) * ROWS, N)
    for n in range(c * ROWS, n_end):
        row = b * N + n
        dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + b * x_sb + n * x_sn + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * (1.0 + scale.to(tl.float32))
        mean_g = tl.sum(g, axis=0) / D
        mean_gx = tl.sum(g * xhat, axis=0) / D
        dx = rstd * (g - mean_g - xhat * mean_gx)
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


def _triton_launch_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for a row of D elements: at most 16 elements of a row per thread,
    which keeps the backward (seven row-sized fp32 values live) free of spills."""
    block_d = max(16, triton.next_power_of_2(D))
    num_warps = min(32, max(4, block_d // 512))
    return block_d, num_warps


def triton_configs():
    """Every kernel configuration the launchers below can pick, for the sm_80/sm_90 compile
    check in onestep_kernels.aot: (name, kernel, signature, constexprs, compile options)."""
    pointer = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
    block = 16
    while block <= MAX_TRITON_D:
        _, num_warps = _triton_launch_config(block)
        for dtype, p in pointer.items():
            fwd_sig = {"X": p, "SHIFT": p, "SCALE": p, "OUT": p, "MEAN": "*fp32", "RSTD": "*fp32",
                       **{k: "i32" for k in ("N", "D", "x_sb", "x_sn", "shift_sb", "shift_sn",
                                             "scale_sb", "scale_sn")},
                       "eps": "fp32", "BLOCK_D": "constexpr"}
            yield (f"layernorm_modulate_fwd[{dtype},BLOCK_D={block}]",
                   _layernorm_modulate_fwd_kernel, fwd_sig, {"BLOCK_D": block},
                   {"num_warps": num_warps})
            for per_token in (False, True):
                grad = p if per_token else "*fp32"
                bwd_sig = {"DY": p, "X": p, "SCALE": p, "MEAN": "*fp32", "RSTD": "*fp32",
                           "DX": p, "DSHIFT": grad, "DSCALE": grad,
                           **{k: "i32" for k in ("N", "D", "x_sb", "x_sn", "scale_sb",
                                                 "scale_sn")},
                           "ROWS": "constexpr", "BLOCK_D": "constexpr", "PER_TOKEN": "constexpr"}
                constexprs = {"ROWS": BWD_ROWS_PER_PROGRAM, "BLOCK_D": block,
                              "PER_TOKEN": per_token}
                yield (f"layernorm_modulate_bwd[{dtype},BLOCK_D={block},PER_TOKEN={per_token}]",
                       _layernorm_modulate_bwd_kernel, bwd_sig, constexprs,
                       {"num_warps": num_warps})
        block *= 2


def _triton_fwd(x, shift, scale, out, mean, rstd, eps):
    B, N, D = x.shape
    block_d, num_warps = _triton_launch_config(D)
    _layernorm_modulate_fwd_kernel[(B * N,)](
        x, shift, scale, out, mean, rstd, N, D, *bn_strides(x), *bn_strides(shift),
        *bn_strides(scale), eps, BLOCK_D=block_d, num_warps=num_warps)


def _triton_bwd(dy, x, scale, mean, rstd, dx, dshift, dscale, per_token):
    B, N, D = x.shape
    block_d, num_warps = _triton_launch_config(D)
    chunks = triton.cdiv(N, BWD_ROWS_PER_PROGRAM)
    if per_token:
        grad_shift, grad_scale = dshift, dscale
    else:
        grad_shift = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
        grad_scale = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
    _layernorm_modulate_bwd_kernel[(B, chunks)](
        dy, x, scale, mean, rstd, dx, grad_shift, grad_scale, N, D, *bn_strides(x),
        *bn_strides(scale), ROWS=BWD_ROWS_PER_PROGRAM, BLOCK_D=block_d,
        PER_TOKEN=per_token, num_warps=num_warps)
    if not per_token:
        dshift.copy_(grad_shift.sum(dim=1))
        dscale.copy_(grad_scale.sum(dim=1))


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/layernorm_modulate.cpp, csrc/cuda/layernorm_modulate.cu)
# ---------------------------------------------------------------------------------------------


def _cpu_fwd(x, shift, scale, out, mean, rstd, eps):
    B, N, D = x.shape
    code = native.cpu_module.layernorm_modulate_fwd(
        native.ptr(x), native.ptr(shift), native.ptr(scale), native.ptr(out), native.ptr(mean),
        native.ptr(rstd), B, N, D, *bn_strides(x), *bn_strides(shift), *bn_strides(scale),
        native.dtype_code(x), eps, torch.get_num_threads())
    native.check_cpu_status(code, "layernorm_modulate forward")


def _cpu_bwd(dy, x, scale, mean, rstd, dx, dshift, dscale, per_token):
    B, N, D = x.shape
    code = native.cpu_module.layernorm_modulate_bwd(
        native.ptr(dy), native.ptr(x), native.ptr(scale), native.ptr(mean), native.ptr(rstd),
        native.ptr(dx), native.ptr(dshift), native.ptr(dscale), B, N, D, *bn_strides(x),
        *bn_strides(scale), int(per_token), native.dtype_code(x), torch.get_num_threads())
    native.check_cpu_status(code, "layernorm_modulate backward")


def _cuda_fwd(x, shift, scale, out, mean, rstd, eps):
    B, N, D = x.shape
    code = native.cuda_library().onestep_cuda_layernorm_modulate_fwd(
        native.ptr(x), native.ptr(shift), native.ptr(scale), native.ptr(out), native.ptr(mean),
        native.ptr(rstd), B, N, D, *bn_strides(x), *bn_strides(shift), *bn_strides(scale),
        native.dtype_code(x), eps, native.cuda_stream(x))
    native.check_cuda_status(code, "layernorm_modulate forward")


def _cuda_bwd(dy, x, scale, mean, rstd, dx, dshift, dscale, per_token):
    B, N, D = x.shape
    code = native.cuda_library().onestep_cuda_layernorm_modulate_bwd(
        native.ptr(dy), native.ptr(x), native.ptr(scale), native.ptr(mean), native.ptr(rstd),
        native.ptr(dx), native.ptr(dshift), native.ptr(dscale), B, N, D, *bn_strides(x),
        *bn_strides(scale), int(per_token), native.dtype_code(x), native.cuda_stream(x))
    native.check_cuda_status(code, "layernorm_modulate backward")


_FWD = {"triton": _triton_fwd, "cpu": _cpu_fwd, "cuda": _cuda_fwd}
_BWD = {"triton": _triton_bwd, "cpu": _cpu_bwd, "cuda": _cuda_bwd}


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("onestep::layernorm_modulate_fwd", mutates_args=())
def layernorm_modulate_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, rstd); mean and rstd are fp32 (B, N), kept for the backward."""
    B, N, D = x.shape
    out = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if B * N > 0:
        with on_device(x):
            launcher(_FWD, backend)(x, shift, scale, out, mean, rstd, eps)
    return out, mean, rstd


@layernorm_modulate_fwd.register_fake
def _(x, shift, scale, eps, backend):
    B, N, D = x.shape
    stats = x.new_empty((B, N), dtype=torch.float32)
    return x.new_empty((B, N, D)), stats, torch.empty_like(stats)


@torch.library.custom_op("onestep::layernorm_modulate_bwd", mutates_args=())
def layernorm_modulate_bwd(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dshift, dscale); dshift and dscale have scale's shape."""
    per_token = scale.dim() == 3
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dshift = torch.empty(scale.shape, dtype=x.dtype, device=x.device)
    dscale = torch.empty(scale.shape, dtype=x.dtype, device=x.device)
    with on_device(x):
        launcher(_BWD, backend)(dy.contiguous(), x, scale, mean, rstd, dx, dshift, dscale,
                                per_token)
    return dx, dshift, dscale


@layernorm_modulate_bwd.register_fake
def _(dy, x, scale, mean, rstd, backend):
    return x.new_empty(x.shape), x.new_empty(scale.shape), x.new_empty(scale.shape)


@torch.library.custom_op("onestep::layernorm_modulate_out", mutates_args=("out",))
def layernorm_modulate_out(x: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str,
                           out: Tensor) -> None:
    """Forward into a caller's buffer (inference: no autograd)."""
    B, N, _ = x.shape
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if B * N > 0:
        with on_device(x):
            launcher(_FWD, backend)(x, shift, scale, out, mean, rstd, eps)


@layernorm_modulate_out.register_fake
def _(x, shift, scale, eps, backend, out):
    return None


def _setup_context(ctx, inputs, output):
    x, _shift, scale, _eps, backend = inputs
    _out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.backend = backend


def _backward(ctx, dout, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = layernorm_modulate_bwd(dout, x, scale, mean, rstd, ctx.backend)
    return dx, dshift, dscale, None, None


layernorm_modulate_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *,
                       backend: str | None = None, out: Tensor | None = None) -> Tensor:
    """LayerNorm(x) * (1 + scale) + shift, fused; see the module docstring.

    Args:
        x: (B, N, D) float32, float16 or bfloat16; the last dimension must have stride 1
            (other strides are read as they are, without a copy).
        shift, scale: (B, D) per-sample or (B, N, D) per-token modulation, same dtype and
            device as x, same shape as each other, last dimension contiguous (views such as
            ``c.chunk(6, dim=1)`` are read in place).
        eps: added to the variance.
        backend: "triton", "cuda", "cpu" or "torch"; None picks as onestep_kernels.dispatch
            describes.
        out: optional contiguous (B, N, D) buffer of x's dtype and device to write into and
            return; for inference (an error if gradients are needed). Reusing one buffer
            avoids the page faults of a fresh large allocation (see onestep_kernels.memory).
    """
    checks.tensor("x", x, (3,))
    checks.tensor("shift", shift, (2, 3))
    checks.tensor("scale", scale, (2, 3))
    checks.same_dtype_device("shift", shift, x, "x")
    checks.same_dtype_device("scale", scale, x, "x")
    eps = checks.positive_float("eps", eps)
    B, N, D = x.shape
    if D == 0:
        raise ValueError(f"x: the last dimension (D) must be positive, got shape {tuple(x.shape)}")
    expected = [(B, D), (B, N, D)]
    if tuple(shift.shape) not in expected:
        raise ValueError(f"shift: expected shape {expected[0]} or {expected[1]} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(shift.shape)}")
    if scale.shape != shift.shape:
        raise ValueError(f"scale: expected the shape of shift {tuple(shift.shape)}, "
                         f"got {tuple(scale.shape)}")
    cannot = {}
    if D > MAX_TRITON_D:
        cannot["triton"] = f"x: the triton kernels handle D <= {MAX_TRITON_D}, got D={D}"
    elif reason := interpreter_bf16_reason(x, "x"):
        cannot["triton"] = reason
    name = dispatch.resolve(backend, x.device, cannot)
    if out is not None:
        _check_out(out, x, shift, scale)
        if name == "torch":
            return out.copy_(reference(x, shift, scale, eps))
        layernorm_modulate_out(x, shift, scale, eps, name, out)
        return out
    if name == "torch":
        return reference(x, shift, scale, eps)
    return layernorm_modulate_fwd(x, shift, scale, eps, name)[0]


def _check_out(out, x: Tensor, shift: Tensor, scale: Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    checks.same_dtype_device("out", out, x, "x")
    if out.shape != x.shape or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous tensor of shape {tuple(x.shape)}, got shape "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, shift, scale, out)):
        raise ValueError("out: writing into a buffer does not record gradients; call without "
                         "out=, or under torch.no_grad()")
    if out.data_ptr() in (x.data_ptr(), shift.data_ptr(), scale.data_ptr()) and out.numel():
        raise ValueError("out: must not share memory with x, shift or scale")
