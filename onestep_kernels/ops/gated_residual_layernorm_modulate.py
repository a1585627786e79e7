"""gated_residual_layernorm_modulate: a DiT block's gated residual and the next modulated
LayerNorm in one pass over each row.

    residual = x + gate * y
    out      = LayerNorm(residual) * (1 + scale) + shift          (no affine, eps added to var)

x, y are (B, N, D); gate, shift, scale are all (B, D) per-sample or all (B, N, D) per-token.
Returns (residual, out); both carry gradients. Arithmetic in fp32 (the LayerNorm sees the fp32
residual, before its rounding to the output dtype); outputs in x's dtype.

The op's whole story lives here: reference, Triton kernels and launchers, native launchers,
torch.library registration (fake + autograd) and the public entry point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks, dispatch, native
from ..triton_compat import tl, triton
from .common import (backward_for_cuda, bn_strides, interpreter_bf16_reason, launcher,
                     on_device)

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
    X, Y, GATE, SHIFT, SCALE, RES, OUT, MEAN, RSTD,
    N, D, gate_sb, gate_sn, shift_sb, shift_sn, scale_sb, scale_sn, eps,
    BLOCK_D: tl.constexpr,
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
    mean = tl.sum(r, axis=0) / D
    diff = tl.where(mask, r - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
    shift = tl.load(SHIFT + b * shift_sb + n * shift_sn + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(RES + row * D + cols, r.to(RES.dtype.element_ty), mask=mask)
    out = diff * rstd * (1.0 + scale) + shift
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _gated_residual_layernorm_modulate_bwd_kernel(
    DRES, DOUT, RES, Y, GATE, SCALE, MEAN, RSTD, DX, DY, DGATE, DSHIFT, DSCALE,
    N, D, gate_sb, gate_sn, scale_sb, scale_sn,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # Program (b, c) handles rows [c * ROWS, (c + 1) * ROWS) of sample b; per-sample
    # modulation gradients go to partial rows DGATE/DSHIFT/DSCALE[b, c], summed by the launcher.
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n in range(c * ROWS, tl.minimum((c + 1) * ROWS, N)):
        row = b * N + n
        dout = tl.load(DOUT + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        res = tl.load(RES + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (res - mean) * rstd, 0.0)
        g = dout * (1.0 + scale.to(tl.float32))
        mean_g = tl.sum(g, axis=0) / D
        mean_gx = tl.sum(g * xhat, axis=0) / D
        dres = tl.load(DRES + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        dr = dres + rstd * (g - mean_g - xhat * mean_gx)
        y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + b * gate_sb + n * gate_sn + cols, mask=mask, other=0.0)
        tl.store(DX + row * D + cols, dr.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + row * D + cols, (dr * gate.to(tl.float32)).to(DY.dtype.element_ty),
                 mask=mask)
        if PER_TOKEN:
            tl.store(DGATE + row * D + cols, (dr * y).to(DGATE.dtype.element_ty), mask=mask)
            tl.store(DSHIFT + row * D + cols, dout.to(DSHIFT.dtype.element_ty), mask=mask)
            tl.store(DSCALE + row * D + cols, (dout * xhat).to(DSCALE.dtype.element_ty),
                     mask=mask)
        else:
            acc_gate += dr * y
            acc_shift += dout
            acc_scale += dout * xhat
    if not PER_TOKEN:
        part = (b * tl.num_programs(1) + c) * D
        tl.store(DGATE + part + cols, acc_gate, mask=mask)
        tl.store(DSHIFT + part + cols, acc_shift, mask=mask)
        tl.store(DSCALE + part + cols, acc_scale, mask=mask)


def _triton_launch_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): at most 8 row elements per thread (16, layernorm_modulate's
    rule, spilled in the backward at BLOCK_D=2048)."""
    block_d = max(16, triton.next_power_of_2(D))
    return block_d, min(16, max(4, block_d // 256))


def triton_configs():
    """Every configuration the launchers can pick, for onestep_kernels.aot:
    (name, kernel, signature, constexprs, compile options)."""
    ints = ("N", "D", "gate_sb", "gate_sn", "scale_sb", "scale_sn")
    block = 16
    while block <= MAX_TRITON_D:
        _, num_warps = _triton_launch_config(block)
        for dtype in ("fp32", "fp16", "bf16"):
            p = f"*{dtype}"
            fwd_sig = {**{k: p for k in ("X", "Y", "GATE", "SHIFT", "SCALE", "RES", "OUT")},
                       "MEAN": "*fp32", "RSTD": "*fp32",
                       **{k: "i32" for k in ints + ("shift_sb", "shift_sn")},
                       "eps": "fp32", "BLOCK_D": "constexpr"}
            yield (f"gated_residual_layernorm_modulate_fwd[{dtype},BLOCK_D={block}]",
                   _gated_residual_layernorm_modulate_fwd_kernel, fwd_sig, {"BLOCK_D": block},
                   {"num_warps": num_warps})
            for per_token in (False, True):
                grad = p if per_token else "*fp32"
                bwd_sig = {**{k: p for k in ("DRES", "DOUT", "RES", "Y", "GATE", "SCALE")},
                           "MEAN": "*fp32", "RSTD": "*fp32", "DX": p, "DY": p,
                           "DGATE": grad, "DSHIFT": grad, "DSCALE": grad,
                           **{k: "i32" for k in ints},
                           "ROWS": "constexpr", "BLOCK_D": "constexpr", "PER_TOKEN": "constexpr"}
                yield (f"gated_residual_layernorm_modulate_bwd[{dtype},BLOCK_D={block},"
                       f"PER_TOKEN={per_token}]",
                       _gated_residual_layernorm_modulate_bwd_kernel, bwd_sig,
                       {"ROWS": BWD_ROWS_PER_PROGRAM, "BLOCK_D": block, "PER_TOKEN": per_token},
                       {"num_warps": num_warps})
        block *= 2


def _mod_strides(gate: Tensor, shift: Tensor, scale: Tensor) -> list[int]:
    return [*bn_strides(gate), *bn_strides(shift), *bn_strides(scale)]


def _triton_fwd(x, y, gate, shift, scale, res, out, mean, rstd, eps):
    B, N, D = x.shape
    block_d, num_warps = _triton_launch_config(D)
    _gated_residual_layernorm_modulate_fwd_kernel[(B * N,)](
        x, y, gate, shift, scale, res, out, mean, rstd, N, D, *_mod_strides(gate, shift, scale),
        eps, BLOCK_D=block_d, num_warps=num_warps)


def _triton_bwd(dres, dout, res, y, gate, scale, mean, rstd, dx, dy, dgate, dshift, dscale,
                per_token):
    B, N, D = res.shape
    block_d, num_warps = _triton_launch_config(D)
    chunks = triton.cdiv(N, BWD_ROWS_PER_PROGRAM)
    if per_token:
        grads = (dgate, dshift, dscale)
    else:
        grads = tuple(torch.empty((B, chunks, D), dtype=torch.float32, device=res.device)
                      for _ in range(3))
    _gated_residual_layernorm_modulate_bwd_kernel[(B, chunks)](
        dres, dout, res, y, gate, scale, mean, rstd, dx, dy, *grads, N, D, *bn_strides(gate),
        *bn_strides(scale), ROWS=BWD_ROWS_PER_PROGRAM, BLOCK_D=block_d, PER_TOKEN=per_token,
        num_warps=num_warps)
    if not per_token:
        for dst, partial in zip((dgate, dshift, dscale), grads):
            dst.copy_(partial.sum(dim=1))


# ---------------------------------------------------------------------------------------------
# Native launchers (csrc/cpu/gated_residual_layernorm_modulate.cpp, csrc/cuda/...cu)
# ---------------------------------------------------------------------------------------------


def _cpu_fwd(x, y, gate, shift, scale, res, out, mean, rstd, eps):
    B, N, D = x.shape
    code = native.cpu_module.gated_residual_layernorm_modulate_fwd(
        *map(native.ptr, (x, y, gate, shift, scale, res, out, mean, rstd)), B, N, D,
        _mod_strides(gate, shift, scale), native.dtype_code(x), eps, torch.get_num_threads())
    native.check_cpu_status(code, "gated_residual_layernorm_modulate forward")


def _cpu_bwd(dres, dout, res, y, gate, scale, mean, rstd, dx, dy, dgate, dshift, dscale,
             per_token):
    B, N, D = res.shape
    code = native.cpu_module.gated_residual_layernorm_modulate_bwd(
        *map(native.ptr, (dres, dout, res, y, gate, scale, mean, rstd, dx, dy, dgate, dshift,
                          dscale)),
        B, N, D, [*bn_strides(gate), 0, 0, *bn_strides(scale)], int(per_token),
        native.dtype_code(res), torch.get_num_threads())
    native.check_cpu_status(code, "gated_residual_layernorm_modulate backward")


def _cuda_fwd(x, y, gate, shift, scale, res, out, mean, rstd, eps):
    B, N, D = x.shape
    code = native.cuda_library().onestep_cuda_gated_residual_layernorm_modulate_fwd(
        *map(native.ptr, (x, y, gate, shift, scale, res, out, mean, rstd)), B, N, D,
        native.int64_array(_mod_strides(gate, shift, scale)), native.dtype_code(x), eps,
        native.cuda_stream(x))
    native.check_cuda_status(code, "gated_residual_layernorm_modulate forward")


def _torch_bwd(dres, dout, res, y, gate, scale, mean, rstd, dx, dy, dgate, dshift, dscale,
               per_token):
    """The backward in PyTorch ops (for the cuda backend without Triton)."""
    f32 = torch.float32
    g3, s3 = (gate.to(f32), scale.to(f32)) if per_token else (gate[:, None].to(f32),
                                                              scale[:, None].to(f32))
    xhat = (res.to(f32) - mean[..., None]) * rstd[..., None]
    g = dout.to(f32) * (1 + s3)
    dln = rstd[..., None] * (g - g.mean(-1, keepdim=True)
                             - xhat * (g * xhat).mean(-1, keepdim=True))
    dr = dres.to(f32) + dln
    mod_grads = (dr * y.to(f32), dout.to(f32), dout.to(f32) * xhat)
    if not per_token:
        mod_grads = tuple(t.sum(1) for t in mod_grads)
    dx.copy_(dr)
    dy.copy_(dr * g3)
    for dst, src in zip((dgate, dshift, dscale), mod_grads):
        dst.copy_(src)


_FWD = {"triton": _triton_fwd, "cpu": _cpu_fwd, "cuda": _cuda_fwd}
# No CUDA C++ backward yet: the cuda backend's backward runs Triton's kernel when Triton can
# run, else PyTorch ops (see _backward).
_BWD = {"triton": _triton_bwd, "cpu": _cpu_bwd, "torch_ops": _torch_bwd}


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("onestep::gated_residual_layernorm_modulate_fwd", mutates_args=())
def gated_residual_layernorm_modulate_fwd(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor,
                                          scale: Tensor, eps: float, backend: str
                                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (residual, out, mean, rstd); mean/rstd are fp32 (B, N) for the backward."""
    B, N, D = x.shape
    res = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    out = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if B * N > 0:
        with on_device(x):
            launcher(_FWD, backend)(x, y, gate, shift, scale, res, out, mean, rstd, eps)
    return res, out, mean, rstd


@gated_residual_layernorm_modulate_fwd.register_fake
def _(x, y, gate, shift, scale, eps, backend):
    B, N, D = x.shape
    stats = x.new_empty((B, N), dtype=torch.float32)
    return x.new_empty((B, N, D)), x.new_empty((B, N, D)), stats, torch.empty_like(stats)


@torch.library.custom_op("onestep::gated_residual_layernorm_modulate_bwd", mutates_args=())
def gated_residual_layernorm_modulate_bwd(dres: Tensor, dout: Tensor, res: Tensor, y: Tensor,
                                          gate: Tensor, scale: Tensor, mean: Tensor,
                                          rstd: Tensor, backend: str
                                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dy, dgate, dshift, dscale)."""
    per_token = gate.dim() == 3
    dx, dy = torch.empty_like(res), torch.empty_like(res)
    dgate, dshift, dscale = (torch.empty(gate.shape, dtype=res.dtype, device=res.device)
                             for _ in range(3))
    with on_device(res):
        launcher(_BWD, backend)(dres.contiguous(), dout.contiguous(), res, y, gate, scale, mean,
                                rstd, dx, dy, dgate, dshift, dscale, per_token)
    return dx, dy, dgate, dshift, dscale


@gated_residual_layernorm_modulate_bwd.register_fake
def _(dres, dout, res, y, gate, scale, mean, rstd, backend):
    return (res.new_empty(res.shape), res.new_empty(res.shape), res.new_empty(gate.shape),
            res.new_empty(gate.shape), res.new_empty(gate.shape))


def _setup_context(ctx, inputs, output):
    _x, y, gate, _shift, scale, _eps, backend = inputs
    res, _out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(res, y, gate, scale, mean, rstd)
    ctx.backend = backend


def _backward(ctx, dres, dout, _dmean, _drstd):
    res, y, gate, scale, mean, rstd = ctx.saved_tensors
    backend = backward_for_cuda("torch_ops") if ctx.backend == "cuda" else ctx.backend
    dx, dy, dgate, dshift, dscale = gated_residual_layernorm_modulate_bwd(
        dres, dout, res, y, gate, scale, mean, rstd, backend)
    return dx, dy, dgate, dshift, dscale, None, None


gated_residual_layernorm_modulate_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def gated_residual_layernorm_modulate(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor,
                                      scale: Tensor, eps: float = 1e-6, *,
                                      backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(x + gate * y, LayerNorm(x + gate * y) * (1 + scale) + shift), fused.

    Args:
        x, y: (B, N, D) float32/float16/bfloat16, same dtype and device; made contiguous (a
            copy only if they are not).
        gate, shift, scale: all (B, D) or all (B, N, D), x's dtype and device, last dimension
            contiguous; strided views such as ``c.chunk(6, dim=1)`` are read in place.
        eps: added to the variance.
        backend: "triton", "cuda", "cpu", "torch" or None (see onestep_kernels.dispatch).
    """
    checks.tensor("x", x, (3,))
    checks.tensor("y", y, (3,))
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        checks.tensor(name, t, (2, 3))
    for name, t in (("y", y), ("gate", gate), ("shift", shift), ("scale", scale)):
        checks.same_dtype_device(name, t, x, "x")
    eps = checks.positive_float("eps", eps)
    B, N, D = x.shape
    if D == 0:
        raise ValueError(f"x: the last dimension (D) must be positive, got shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if tuple(gate.shape) not in ((B, D), (B, N, D)):
        raise ValueError(f"gate: expected shape {(B, D)} or {(B, N, D)} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(gate.shape)}")
    for name, t in (("shift", shift), ("scale", scale)):
        if t.shape != gate.shape:
            raise ValueError(f"{name}: expected the shape of gate {tuple(gate.shape)}, "
                             f"got {tuple(t.shape)}")
    cannot = {}
    if D > MAX_TRITON_D:
        cannot["triton"] = f"x: the triton kernels handle D <= {MAX_TRITON_D}, got D={D}"
    elif reason := interpreter_bf16_reason(x, "x"):
        cannot["triton"] = reason
    name = dispatch.resolve(backend, x.device, cannot)
    if name == "torch":
        return reference(x, y, gate, shift, scale, eps)
    res, out, _, _ = gated_residual_layernorm_modulate_fwd(x.contiguous(), y.contiguous(), gate,
                                                           shift, scale, eps, name)
    return res, out
