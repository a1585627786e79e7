"""Autograd nodes that span two of a DiT block's steps, for `dit_block_forward` with gradients.

Every `torch.autograd.Function` call costs a few microseconds of host time on top of its work
(the node, its context, its saved tensors: ~5 us on the dev VM, about one native op), and a
block that records one node per fused op pays it per op. Where one step's output only feeds
the next and nothing can observe it in between, the two steps can be one node:

- `gated_mlp_input`: the attention branch's gated residual and the MLP's modulated LayerNorm
  (gated_residual_layernorm_modulate), then fc1's bias-free product, its bias and GELU(tanh)
  (bias_gelu_tanh), for an fc1 that is a bare nn.Linear. The normalised tokens h go only to
  fc1, so the block records one node where it recorded two.

The nodes run the ops' own launchers forward and backward (the same kernels, in the same
order, as the two separate nodes) and write the product's backward out as autograd would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .dispatch import Backend
from .ops import bias_gelu_tanh as gelu_op
from .ops import gated_residual_layernorm_modulate as gated_op
from .ops.common import eager_apply


class _GatedMlpInput(torch.autograd.Function):
    """(residual, GELU_tanh(F.linear(LN(residual) * (1 + scale) + shift, weight) + bias)),
    residual = x + gate * y."""

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, weight, bias, eps, backends):
        gated, gelu = backends
        res, h, stats = gated_op._forward(gated, x, y, gate, shift, scale, eps)
        # fc1 as linear_apply runs it: in h's dtype, or autocast's where it is on; the bias
        # cast to the product's
        if weight.dtype is not h.dtype or checks.any_autocast():
            dtype = checks.compute_dtype(checks.LOWER, (h,))
            h, weight = checks.cast(h, dtype), checks.cast(weight, dtype)
        u = torch.nn.functional.linear(h, weight)
        if bias.dtype is not u.dtype:
            bias = bias.to(u.dtype)
        ctx.save_for_backward(res, y, gate, scale, stats, h, weight, u, bias)
        ctx.backends = backends
        return res, gelu_op._forward(gelu, u, bias)

    @staticmethod
    def backward(ctx, dres, dhidden):
        res, y, gate, scale, stats, h, weight, u, bias = ctx.saved_tensors
        gated, gelu = ctx.backends
        du, dbias = gelu_op._backward(gelu, dhidden, u, bias)
        dweight = None
        if ctx.needs_input_grad[5]:
            dweight = du.reshape(-1, du.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
        # h's gradient in the LayerNorm's dtype (fp32 under CUDA autocast, where the product
        # ran in half precision): the cast autograd would make between the two nodes
        dh = checks.cast(du @ weight, res.dtype)
        dx, dy, dmod = gated_op._backward(gated, dres, dh, res, y, gate, scale, stats)
        return dx, dy, *dmod.unbind(0), dweight, dbias, None, None


_gated_mlp_input = eager_apply(_GatedMlpInput, tensors=7)


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
    dtype = checks.compute_dtype(checks.LOWER, (x,)) if checks.any_autocast() else x.dtype
    gelu = gelu_op.OP.resolve(None, x.device, dtype, weight.shape[0], True)
    if gelu.is_expression:
        return None
    return _gated_mlp_input(x, y, gate, shift, scale, weight, bias, eps, (gated, gelu))
