"""fused_linear: a linear layer with a DiT block's memory-bound neighbours folded into the
matrix product, so that the activations between them never go through memory.

    h   = LayerNorm(x) * (1 + scale) + shift     if shift/scale are given (the prologue)
    u   = h @ weight^T + bias
    a   = GELU_tanh(u)                           if activation == "gelu_tanh"
    out = residual + gate * a                    if gate/residual are given (the epilogue)

In a DiT block: QKV = fused_linear(x, W_qkv, b, shift=sh1, scale=sc1); the attention branch's
residual = fused_linear(attn, W_proj, b, gate=g1, residual=x); the MLP's hidden =
fused_linear(x, W_fc1, b, shift=sh2, scale=sc2, activation="gelu_tanh") and its residual =
fused_linear(hidden, W_fc2, b, gate=g2, residual=x).

x is (B, N, K); weight (M_out, K); bias (M_out,); shift, scale (B, K) per sample or (B, N, K)
per token (one shape for both); gate (B, M_out) or (B, N, M_out); residual (B, N, M_out).
LayerNorm statistics, products and epilogue in fp32; output in x's dtype.

Backends:
  triton     one kernel per call (forward only, for inference): each program owns a tile of
             output rows x columns, first walks its rows once for the LayerNorm statistics
             (Chan's merge of per-chunk mean and squared deviations), then runs the K loop
             with the modulation applied to each tile of x before the product, and the bias,
             GELU and gated residual applied to the accumulator before the one store.
  separate   the same as separate steps: onestep's layernorm_modulate, F.linear,
             bias_gelu_tanh, addcmul; what runs whenever a gradient is needed (the fused
             kernel has no backward).
  reference  the formula in plain PyTorch.
No cpu or cuda kernel: their matrix products would be PyTorch's anyway.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, dispatch
from ..dispatch import Backend
from ..errors import ArgumentError
from ..kernel_config import KernelConfig
from ..op_spec import Op, OpSpec
from ..triton_compat import tl, triton
from . import bias_gelu_tanh as bias_gelu_tanh_op
from . import layernorm_modulate as layernorm_modulate_op
from .common import bn_strides, cdiv, needs_grad
from .layernorm_core import modulate  # by bare name: see layernorm_modulate's import

ACTIVATIONS = (None, "gelu_tanh")


def reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, shift: Tensor | None = None,
              scale: Tensor | None = None, eps: float = 1e-6, activation: str | None = None,
              gate: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """The formula in plain PyTorch, in fp32 (fp64 if given fp64); returns x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)

    def per_row(t):  # (B, C) per sample broadcasts over the tokens
        return t.to(compute)[:, None] if t.dim() == 2 else t.to(compute)

    h = x.to(compute)
    if shift is not None:
        h = F.layer_norm(h, h.shape[-1:], eps=eps) * (1 + per_row(scale)) + per_row(shift)
    u = F.linear(h, weight.to(compute), None if bias is None else bias.to(compute))
    if activation == "gelu_tanh":
        u = F.gelu(u, approximate="tanh")
    if gate is not None:
        u = residual.to(compute) + per_row(gate) * u
    return u.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fused_linear_kernel(
    X, W, BIAS, SHIFT, SCALE, GATE, RES, OUT,
    ROWS, TOKENS, KSIZE, COLS,
    sx, sw, sres, shift_sb, shift_sn, scale_sb, scale_sn, gate_sb, gate_sn, eps,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GELU: tl.constexpr, GATED: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Programs walk the output tiles in groups of GROUP_M row blocks, so that neighbouring
    # programs share rows of x and columns of weight in L2 (as in Triton's matmul tutorial).
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(ROWS, BLOCK_M)
    blocks_n = tl.cdiv(COLS, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    # Offsets in int32 (the launcher sends tensors of 2^31 elements or more elsewhere);
    # pointers are set up once and advanced by BLOCK_K, as in Triton's matmul tutorial.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < ROWS
    col_ok = cols < COLS
    b = rows // TOKENS
    n = rows % TOKENS
    x_ptrs = X + rows[:, None] * sx + ks[None, :]

    if NORM:  # LayerNorm statistics of the program's rows, merged chunk by chunk (Chan et al.)
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, KSIZE, BLOCK_K):
            k_ok = ks < KSIZE - k0
            a = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = a.to(tl.float32)
            count = tl.sum(k_ok.to(tl.float32), axis=0)
            done = k0 * 1.0
            chunk_mean = tl.sum(a, axis=1) / count
            dev = tl.where(k_ok[None, :], a - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            total = done + count
            mean = mean + delta * (count / total)
            m2 = m2 + tl.sum(dev * dev, axis=1) + delta * delta * (done * count / total)
        rstd = 1.0 / tl.sqrt(m2 / KSIZE + eps)
        scale_ptrs = SCALE + (b * scale_sb + n * scale_sn)[:, None] + ks[None, :]
        shift_ptrs = SHIFT + (b * shift_sb + n * shift_sn)[:, None] + ks[None, :]

    w_ptrs = W + cols[None, :] * sw + ks[:, None]  # a (BLOCK_K, BLOCK_N) tile of weight^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KSIZE, BLOCK_K):
        k_ok = ks < KSIZE - k0
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(x_ptrs, mask=a_mask, other=0.0)
        if NORM:
            scale = tl.load(scale_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            # (padding columns of a become non-zero here; the weight's padding rows are zeros)
            a = modulate((a.to(tl.float32) - mean[:, None]) * rstd[:, None], shift, scale)
            scale_ptrs += BLOCK_K
            shift_ptrs += BLOCK_K
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a.to(w.dtype), w)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:  # u * sigmoid(2 z), z = sqrt(2 / pi) (u + 0.044715 u^3), as in bias_gelu_tanh
        z = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(-2.0 * z))
    out_mask = row_ok[:, None] & col_ok[None, :]
    if GATED:
        gate = tl.load(GATE + (b * gate_sb + n * gate_sn)[:, None] + cols[None, :],
                       mask=out_mask, other=0.0).to(tl.float32)
        res = tl.load(RES + rows[:, None] * sres + cols[None, :], mask=out_mask,
                      other=0.0).to(tl.float32)
        acc = res + gate * acc
    tl.store(OUT + rows[:, None] * COLS + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=out_mask)


def _launch_config(dtype: torch.dtype) -> dict:
    """Tiles per dtype; fp32 (IEEE products, no tensor cores) takes smaller ones, which keeps
    every variant free of spills on sm_80/sm_90 (onestep_kernels.aot)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8}


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def triton_configs():
    """Every (kernel, configuration) the launcher can pick, for onestep_kernels.aot."""
    for dtype, name in _TRITON_DTYPES.items():
        cfg = _launch_config(dtype)
        for norm, gelu, gated, has_bias in itertools.product((False, True), repeat=4):
            constexprs = {"HAS_BIAS": has_bias, "NORM": norm, "GELU": gelu, "GATED": gated,
                          "IEEE": dtype == torch.float32,
                          **{k: v for k, v in cfg.items() if k != "num_warps"}}
            variant = f"norm={int(norm)},gelu={int(gelu)},gated={int(gated)},bias={int(has_bias)}"
            yield KernelConfig(f"fused_linear[{name},{variant}]", _fused_linear_kernel, name,
                               constexprs, cfg["num_warps"])


def _triton_fused_linear(x, weight, bias, shift, scale, gate, residual, out, eps, gelu):
    B, N, K = x.shape
    cols = weight.shape[0]
    cfg = _launch_config(x.dtype)
    x2d = x.reshape(B * N, K)
    dummy = x2d  # stands in for absent tensors; their loads are compiled out
    shift_s = bn_strides(shift) if shift is not None else (0, 0)
    scale_s = bn_strides(scale) if scale is not None else (0, 0)
    gate_s = bn_strides(gate) if gate is not None else (0, 0)
    res2d = residual.reshape(B * N, cols) if residual is not None else None
    grid = (cdiv(B * N, cfg["BLOCK_M"]) * cdiv(cols, cfg["BLOCK_N"]),)
    _fused_linear_kernel[grid](
        x2d, weight, dummy if bias is None else bias, dummy if shift is None else shift,
        dummy if scale is None else scale, dummy if gate is None else gate,
        dummy if res2d is None else res2d, out,
        B * N, N, K, cols, x2d.stride(0), weight.stride(0),
        0 if res2d is None else res2d.stride(0), *shift_s, *scale_s, *gate_s, eps,
        HAS_BIAS=bias is not None, NORM=shift is not None, GELU=gelu, GATED=gate is not None,
        IEEE=x.dtype == torch.float32, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"])


def _separate_steps(x, weight, bias, shift, scale, gate, residual, eps, gelu):
    """The same computation as onestep's separate (differentiable) ops on their default
    backends, and PyTorch's products. Under autocast each step follows it as the reference
    DiT block's expressions do (the LayerNorm as F.layer_norm, the products in the autocast
    dtype)."""
    h = x
    if shift is not None:
        dtype = checks.compute_dtype(checks.LAYER_NORM, (x, shift, scale))
        h, shift, scale = (checks.cast(t, dtype) for t in (x, shift, scale))
        ln = layernorm_modulate_op.OP
        h = ln.apply(ln.resolve(None, h.device, dtype, h.shape[-1], needs_grad(h, shift, scale)),
                     h, shift, scale, eps)
    if gelu:
        u = F.linear(h, weight)
        b = u.new_zeros(u.shape[-1]) if bias is None else checks.cast(bias, u.dtype)
        op = bias_gelu_tanh_op.OP
        y = op.apply(op.resolve(None, u.device, u.dtype, u.shape[-1], needs_grad(u, b)), u, b)
    else:
        y = F.linear(h, weight, bias)
    if gate is None:
        return y
    return torch.addcmul(residual, gate[:, None] if gate.dim() == 2 else gate, y)


def _reference(x, weight, bias, shift, scale, gate, residual, eps, gelu):
    """`reference` in the spec's argument order."""
    return reference(x, weight, bias, shift, scale, eps, "gelu_tanh" if gelu else None, gate,
                     residual)


# ---------------------------------------------------------------------------------------------
# The spec and the backends (see onestep_kernels.op_spec and onestep_kernels.dispatch); the
# width is x's feature count K
# ---------------------------------------------------------------------------------------------


def _example(sizes, device, dtype, generator):
    """A DiT block's QKV projection with the first modulated LayerNorm in its prologue."""
    def rand(*shape):
        return torch.randn(shape, generator=generator, device=device).to(dtype)

    shift, scale = rand(sizes.B, 6 * sizes.D).chunk(6, dim=1)[:2]
    weight = rand(3 * sizes.D, sizes.D) * sizes.D ** -0.5
    return (rand(sizes.B, sizes.N, sizes.D), weight), {"shift": shift, "scale": scale}


SPEC = OpSpec(
    "fused_linear", inputs=("x", "weight", "bias?", "shift?", "scale?", "gate?", "residual?"),
    params=(("eps", float), ("gelu", bool)), outputs=("out",),
    allocate=lambda backend, keep, x, weight, *rest: (
        x.new_empty((*x.shape[:2], weight.shape[0])),),
    empty_if=("x",), contiguous=("x", "weight", "bias", "residual"), example=_example)

OP = Op(SPEC, [
    Backend("triton", "triton", ("cuda",), forward=_triton_fused_linear,
            summary="one kernel, forward only; tensors under 2^31 elements; not under autocast"),
    Backend("separate", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=_separate_steps,
            summary="onestep's separate ops and PyTorch's (cuBLAS) products"),
    Backend("reference", "torch", dispatch.ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
            expression=_reference, summary="the formula in PyTorch"),
], default_order={"cpu": ("separate", "reference"), "sm_90": ("separate", "reference", "triton")},
    torch_alias="separate", width_name="K", triton_configs=triton_configs)


def apply(backend: Backend, x, weight, bias, shift, scale, eps, activation, gate, residual):
    """fused_linear on a resolved backend, for validated arguments (the kernel's operands made
    contiguous)."""
    if not backend.is_expression:
        x, weight = x.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        residual = None if residual is None else residual.contiguous()
    return OP.apply(backend, x, weight, bias, shift, scale, gate, residual, eps,
                    activation == "gelu_tanh")


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _check_modulation(name: str, t: Tensor, x: Tensor, width: int, like: str) -> None:
    checks.tensor(name, t, (2, 3))
    checks.same_device(name, t, x, "x")
    B, N = x.shape[:2]
    if tuple(t.shape) not in ((B, width), (B, N, width)):
        raise ArgumentError(f"{name}: expected shape ({B}, {width}) or ({B}, {N}, {width}) "
                            f"({like}), got {tuple(t.shape)}")


@OP.public_entry
def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                 shift: Tensor | None = None, scale: Tensor | None = None, eps: float = 1e-6,
                 activation: str | None = None, gate: Tensor | None = None,
                 residual: Tensor | None = None, backend: str | None = None) -> Tensor:
    """A linear layer with the modulated LayerNorm before it and GELU and/or a gated residual
    after it, in one kernel where the backend allows; see the module docstring.

    Args:
        x: (B, N, K). weight: (M_out, K). bias: (M_out,) or None.
        shift, scale: both or neither, one shape: (B, K) or (B, N, K).
        eps: the LayerNorm's epsilon (with shift/scale).
        activation: None or "gelu_tanh" (applied before the gated residual).
        gate, residual: both or neither; gate (B, M_out) or (B, N, M_out), residual
            (B, N, M_out).
        backend: "triton" (the fused kernel, inference), "separate" (onestep's separate ops),
            "reference", or None for the default (onestep_kernels.preferences). Mixed dtypes
            are promoted to a common one; under autocast the separate ops run, each following
            autocast.
    """
    checks.tensor("x", x, (3,))
    checks.tensor("weight", weight, (2,))
    checks.same_device("weight", weight, x, "x")
    B, N, K = x.shape
    if K == 0 or weight.shape[1] != K:
        raise ArgumentError(f"weight: expected shape (M_out, {K}) for x of shape "
                            f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    cols = weight.shape[0]
    if bias is not None:
        checks.tensor("bias", bias, (1,))
        checks.same_device("bias", bias, x, "x")
        if bias.shape != (cols,):
            raise ArgumentError(f"bias: expected shape ({cols},), got {tuple(bias.shape)}")
    if (shift is None) != (scale is None):
        raise ArgumentError("shift: shift and scale come together (the modulated LayerNorm)")
    if shift is not None:
        _check_modulation("shift", shift, x, K, "per sample or per token, over x's features")
        _check_modulation("scale", scale, x, K, "per sample or per token, over x's features")
        if scale.shape != shift.shape:
            raise ArgumentError(f"scale: expected the shape of shift {tuple(shift.shape)}, "
                                f"got {tuple(scale.shape)}")
        eps = checks.positive_float("eps", eps)
    if activation not in ACTIVATIONS:
        raise ArgumentError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if (gate is None) != (residual is None):
        raise ArgumentError("gate: gate and residual come together (the gated residual)")
    if gate is not None:
        _check_modulation("gate", gate, x, cols, "per sample or per token, over the outputs")
        checks.tensor("residual", residual, (3,))
        checks.same_device("residual", residual, x, "x")
        if residual.shape != (B, N, cols):
            raise ArgumentError(f"residual: expected shape ({B}, {N}, {cols}), "
                                f"got {tuple(residual.shape)}")

    tensors = [x, weight, bias, shift, scale, gate, residual]
    if checks.autocast_enabled(x.device.type):
        impl = OP.resolve(backend or "separate", x.device, x.dtype, K, needs_grad(*tensors))
        if not impl.is_expression:
            raise ArgumentError(f"backend: {impl.name!r} does not follow autocast; the "
                                "separate ops do (backend='separate' or None)")
        return apply(impl, x, weight, bias, shift, scale, eps, activation, gate, residual)
    dtype = checks.compute_dtype(checks.PROMOTE, tensors)
    x, weight, bias, shift, scale, gate, residual = (checks.cast(t, dtype) for t in tensors)
    impl = OP.resolve(backend, x.device, dtype, K, needs_grad(*tensors))
    if not impl.is_expression and (B * N * cols >= 2**31
                                   or max(t.numel() for t in tensors if t is not None) >= 2**31):
        if backend is not None:
            raise ArgumentError("x: the fused kernel's int32 offsets take tensors under 2^31 "
                                "elements")
        impl = OP["separate"]
    return apply(impl, x, weight, bias, shift, scale, eps, activation, gate, residual)
