"""Autograd nodes that span two of a DiT block's steps, for `dit_block_forward` with gradients.

Every `torch.autograd.Function` call costs a few microseconds of host time on top of its work
(the node, its context, its saved tensors: ~5 us on the dev VM, about one native op), and a
block that records one node per fused op pays it per op. Where one step's output only feeds
the next and nothing can observe it in between, the steps can be one node:

- `linear_bias_gelu`: fc1 of a DiT MLP: PyTorch's bias-free product (cuBLAS on a GPU), then
  bias_gelu_tanh on it. One node where the product alone records four (the weight's
  transpose, two flattening views, mm): ~3 us less host time per call (dev VM).
- `gated_mlp_input`: the attention branch's gated residual and the MLP's modulated LayerNorm
  (gated_residual_layernorm_modulate), then fc1 as above, for an fc1 that is a bare
  nn.Linear. The normalised tokens h go only to fc1, so the block records one node where it
  recorded two.

The nodes run the ops' own inner layer (op_spec.Op.forward / backward: the same launch
boundary and kernels, in the same order, as the separate nodes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .dispatch import Backend
from .ops import bias_gelu_tanh as gelu_op
from .ops import gated_residual_layernorm_modulate as gated_op
from .ops.common import needs_grad
from .torch_compat import function_apply

GELU, GATED = gelu_op.OP, gated_op.OP


# ---- fc1: the bias-free product, then bias_gelu_tanh -----------------------------------------


def fc1_backend(x: Tensor, weight: Tensor) -> Backend:
    """bias_gelu_tanh's default backend for fc1's output, computed in F.linear's dtype
    (autocast's where it is on), with gradients."""
    dtype = checks.compute_dtype(checks.LOWER, (x,)) if checks.any_autocast() else x.dtype
    return GELU.resolve(None, x.device, dtype, weight.shape[0], True)


def fc1_forward(backend: Backend, x: Tensor, weight: Tensor,
                bias: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """GELU_tanh(F.linear(x, weight) + bias) without recording gradients, and what its
    backward needs: (x, weight, u, bias) with x and weight in the product's dtype (F.linear's:
    autocast's casts where it is on), u the bias-free product, bias cast to u's dtype."""
    if weight.dtype is not x.dtype or checks.any_autocast():
        dtype = checks.compute_dtype(checks.LOWER, (x,))
        x, weight = checks.cast(x, dtype), checks.cast(weight, dtype)
    u = torch.nn.functional.linear(x, weight)
    bias = checks.cast(bias, u.dtype)
    return GELU.forward(backend, u, bias)[0], (x, weight, u, bias)


def fc1_backward(backend: Backend, dy: Tensor, saved: tuple[Tensor, ...], need_x: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(dx, dweight, dbias) from fc1_forward's `saved`, written out as autograd would run
    the product's backward (in the product's dtype: dx = du weight, dweight = du^T x)."""
    x, weight, u, bias = saved
    du, dbias = GELU.backward(backend, (dy,), (u, bias), ())
    dx = du @ weight if need_x else None
    dweight = (du.reshape(-1, du.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
               if need_weight else None)
    return dx, dweight, dbias


class _LinearBiasGelu(torch.autograd.Function):
    """GELU_tanh(F.linear(x, weight) + bias) as one node (autograd casts the gradients to the
    inputs' dtypes, as it does through autocast's casts)."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        y, saved = fc1_forward(backend, x, weight, bias)
        ctx.save_for_backward(*saved)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy):
        # (dbias comes with du anyway)
        return (*fc1_backward(ctx.backend, dy, ctx.saved_tensors, *ctx.needs_input_grad[:2]),
                None)


_linear_bias_gelu = function_apply(_LinearBiasGelu, tensors=3)


def linear_bias_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """GELU_tanh(F.linear(x, weight) + bias) on bias_gelu_tanh's default backend, for fc1 of a
    DiT MLP (x (..., D) contiguous, weight (F, D), bias (F,); dtypes as F.linear's, under
    autocast too, bias cast to the product's). An eager call with gradients records one node;
    otherwise the product, then the op."""
    if needs_grad(x, weight, bias) and not torch.compiler.is_compiling():
        impl = fc1_backend(x, weight)
        if not impl.is_expression:
            return _linear_bias_gelu(x, weight, bias, impl)
    u = torch.nn.functional.linear(x, weight)
    bias = checks.cast(bias, u.dtype)  # as the Linear's own bias would be (autocast)
    grad = needs_grad(u, bias)
    impl = GELU.resolve(None, u.device, u.dtype, u.shape[-1], grad)
    if not grad and not impl.is_expression and not torch.compiler.is_compiling():
        # Inference: the product is this call's own temporary, so the GELU overwrites it (the
        # kernels are elementwise). One (rows, F) buffer less per MLP; on the CPU a second
        # fresh one made glibc's heap grow and shrink by ~4 MB each slt-tiny forward (~900
        # page faults, dev VM).
        return GELU.forward(impl, u, bias, outputs=(u,))[0]
    return GELU.apply(impl, u, bias, grad=grad)


# ---- the gated residual, the MLP's modulated LayerNorm and fc1 --------------------------------


class _GatedMlpInput(torch.autograd.Function):
    """(residual, GELU_tanh(F.linear(LN(residual) * (1 + scale) + shift, weight) + bias)),
    residual = x + gate * y."""

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, weight, bias, eps, backends):
        gated, gelu = backends
        res, h, stats = GATED.forward(gated, x, y, gate, shift, scale, eps, keep=True)
        hidden, fc1_saved = fc1_forward(gelu, h, weight, bias)
        ctx.save_for_backward(x, y, gate, scale, stats, *fc1_saved)
        ctx.backends, ctx.eps = backends, eps
        return res, hidden

    @staticmethod
    def backward(ctx, dres, dhidden):
        x, y, gate, scale, stats, *fc1_saved = ctx.saved_tensors
        gated, gelu = ctx.backends
        dh, dweight, dbias = fc1_backward(gelu, dhidden, fc1_saved, True,
                                          ctx.needs_input_grad[5])
        # h's gradient in the LayerNorm's dtype (fp32 under CUDA autocast, where the product
        # ran in half precision): the cast autograd would make between the two nodes
        dx, dy, dmod = GATED.backward(gated, (dres, checks.cast(dh, x.dtype)),
                                      (x, y, gate, scale, stats), (ctx.eps,))
        return dx, dy, *dmod.unbind(0), dweight, dbias, None, None


_gated_mlp_input = function_apply(_GatedMlpInput, tensors=7)


def gated_mlp_input(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                    weight: Tensor, bias: Tensor, eps: float,
                    gated: Backend) -> tuple[Tensor, Tensor] | None:
    """(residual, fc1's activation) as one autograd node, for validated arguments of
    gated_residual_layernorm_modulate on its resolved backend `gated` and a bare fc1's
    (weight, bias); None where one node cannot run the call (no gradient is recorded, the
    call is traced by torch.compile, or either op resolves to a PyTorch expression, which
    autograd differentiates itself): the caller then runs the two ops."""
    if gated.is_expression or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return None
    gelu = fc1_backend(x, weight)
    if gelu.is_expression:
        return None
    return _gated_mlp_input(x, y, gate, shift, scale, weight, bias, eps, (gated, gelu))
