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
order, as the two separate nodes); fc1's steps are bias_gelu_tanh's `fc1_forward` and
`fc1_backward`, which its own one-node fc1 (`linear_apply`) runs too.
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
        hidden, fc1_saved = gelu_op.fc1_forward(gelu, h, weight, bias)
        ctx.save_for_backward(x, y, gate, scale, stats, *fc1_saved)
        ctx.backends = backends
        return res, hidden

    @staticmethod
    def backward(ctx, dres, dhidden):
        x, y, gate, scale, stats, *fc1_saved = ctx.saved_tensors
        gated, gelu = ctx.backends
        dh, dweight, dbias = gelu_op.fc1_backward(gelu, dhidden, fc1_saved, True,
                                                  ctx.needs_input_grad[5])
        # h's gradient in the LayerNorm's dtype (fp32 under CUDA autocast, where the product
        # ran in half precision): the cast autograd would make between the two nodes
        dx, dy, dmod = gated_op._backward(gated, dres, checks.cast(dh, x.dtype), x, y, gate,
                                          scale, stats)
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
    gelu = gelu_op.fc1_backend(x, weight)
    if gelu.is_expression:
        return None
    return _gated_mlp_input(x, y, gate, shift, scale, weight, bias, eps, (gated, gelu))
