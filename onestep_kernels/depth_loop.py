"""The weight-shared depth loop of a Single-Layer Transformer: one adaLN-Zero DiT block applied
K times, application k with its own modulation (its conditioning and its depth time), on
onestep's fused ops.

    x_{k+1} = x_k + g1_k * attn(LN(x_k) * (1 + sc1_k) + sh1_k)          (then, on that x)
    x_{k+1} = x   + g2_k * mlp(LN(x) * (1 + sc2_k) + sh2_k)

Every modulation comes in at once, (K, B, 6 D), from one matrix product over the K
conditionings (the caller's; a step size Δ_k is folded into the gates there). The end of one
application and the start of the next are one op: application k's gated MLP residual and the
modulated LayerNorm of application k+1's attention input are one
`gated_residual_layernorm_modulate` (the gate of k and the shift and scale of k+1, separate
(B, D) views). So between the matrix products the loop makes 2K + 1 memory-bound LayerNorm
passes (one LayerNorm-modulate, then two gated ops per application, the last one with the
output head's modulation where the caller gives it) where K separate blocks and a head make
3K + 1 (bias+GELU aside, once per application in both).

`reference_depth_loop` is the same loop in plain PyTorch ops: the oracle, and what an unfused
model runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .errors import ArgumentError
from .layers import GATED, LAYERNORM, LN_EPS, attention_then_mlp_input
from .op_spec import needs_grad


def _check(x: Tensor, modulations: Tensor, keep, head) -> tuple[int, set[int]]:
    """Validates the loop's arguments; returns (K, the kept applications)."""
    checks.tensor("x", x, (3,))
    checks.tensor("modulations", modulations, (3,))
    B, N, D = x.shape
    K = modulations.shape[0]
    if modulations.shape[1:] != (B, 6 * D) or K == 0:
        raise ArgumentError(f"modulations: expected shape (K >= 1, {B}, {6 * D}) for x of shape "
                            f"{tuple(x.shape)}, got {tuple(modulations.shape)}")
    kept = set(keep)
    if any(not isinstance(k, int) or not 0 <= k < K for k in kept):
        raise ArgumentError(f"keep: expected applications in 0..{K - 1}, got {sorted(keep)}")
    if head is not None:
        for name, t in zip(("head shift", "head scale"), head):
            checks.tensor(name, t, (2,))
            if t.shape != (B, D):
                raise ArgumentError(f"head: expected (shift, scale) of shape {(B, D)}, got "
                                    f"{tuple(t.shape)}")
    return K, kept


def depth_loop(x: Tensor, modulations: Tensor, attention: Callable[[Tensor], Tensor],
               fc1: nn.Module, fc2: nn.Module, *, eps: float = LN_EPS,
               mlp_norm_eps: float = LN_EPS, keep=(),
               head: tuple[Tensor, Tensor] | None = None
               ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """K applications of one adaLN-Zero block on onestep's fused ops (see the module
    docstring).

    x: (B, N, D) tokens. modulations: (K, B, 6 D), application k's (shift1, scale1, gate1,
        shift2, scale2, gate2), the gates scaled by the step where the model has one.
    attention, fc1, fc2: the block's attention branch (from the modulated tokens to its output
        before the gate) and its MLP's linears, called as modules (hooks and adapters apply).
    eps, mlp_norm_eps: the two LayerNorms' epsilons.
    keep: applications after which the state x_{k+1} is returned (for feature matching and
        the screening's intermediate-depth features), without a second pass.
    head: (shift, scale) of the output head's modulated LayerNorm, (B, D) each: the last
        application's gated residual and the head's LayerNorm then run as one op.

    Returns (x_K, the head's modulated input or None, the kept states in order).
    """
    if isinstance(x, Tensor):
        x = x.contiguous()
    K, kept = _check(x, modulations, keep, head)
    if not (isinstance(eps, float) and 0.0 < eps < math.inf):
        eps = checks.positive_float("eps", eps)
    if not (isinstance(mlp_norm_eps, float) and 0.0 < mlp_norm_eps < math.inf):
        mlp_norm_eps = checks.positive_float("mlp_norm_eps", mlp_norm_eps)
    dtype = x.dtype
    tensors = (x, modulations, *(head or ()))
    if any(t.dtype is not dtype for t in tensors) or checks.any_autocast():
        dtype = checks.compute_dtype(checks.LAYER_NORM, tensors)
        x, modulations = checks.cast(x, dtype), checks.cast(modulations, dtype)
        head = None if head is None else tuple(checks.cast(t, dtype) for t in head)
    grad = needs_grad(*tensors)
    D = x.shape[-1]
    # K (B, D) views of each of the six from one unbind: with gradients, indexing each
    # application's (select) records a node per view whose backward zero-fills a whole
    # (K, B, D) that autograd then sums, 6 K times (K = 28, B = 128, D = 384: ~200 ms of
    # backward on the dev VM's CPU, 336 kernels on a GPU); unbind's backward stacks them once.
    sh1, sc1, g1, sh2, sc2, g2 = (m.unbind(0) for m in modulations.chunk(6, dim=2))
    h = LAYERNORM.apply(LAYERNORM.resolve(None, x.device, dtype, D, grad), x, sh1[0], sc1[0],
                        eps, grad=grad)
    head_input, states = None, []
    for k in range(K):
        x, hidden = attention_then_mlp_input(x, h, attention, fc1, g1[k], sh2[k], sc2[k],
                                             mlp_norm_eps, grad)
        out = checks.cast(fc2(hidden), dtype).contiguous()
        last = k == K - 1
        if last and head is None:
            x = torch.addcmul(x, g2[k].unsqueeze(1), out)
        else:  # application k's MLP residual, and the next LayerNorm (k+1's, or the head's)
            shift, scale = head if last else (sh1[k + 1], sc1[k + 1])
            grad = grad or out.requires_grad
            x, h = GATED.apply(GATED.resolve(None, x.device, dtype, D, grad), x, out, g2[k],
                               shift, scale, eps, grad=grad)
            if last:
                head_input = h
        if k in kept:
            states.append(x)
    return x, head_input, states


def reference_depth_loop(x: Tensor, modulations: Tensor, attention: Callable[[Tensor], Tensor],
                         mlp: Callable[[Tensor], Tensor], *, eps: float = LN_EPS,
                         mlp_norm_eps: float = LN_EPS, keep=(),
                         head: tuple[Tensor, Tensor] | None = None
                         ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """depth_loop in plain PyTorch ops, as K reference blocks compute it (`mlp`: the whole
    MLP branch); the same arguments and results."""
    K, kept = _check(x, modulations, keep, head)
    D = x.shape[-1]

    def modulated(t, shift, scale, norm_eps):
        return (F.layer_norm(t, (D,), eps=norm_eps) * (1 + scale.unsqueeze(1))
                + shift.unsqueeze(1))

    sh1, sc1, g1, sh2, sc2, g2 = (m.unbind(0) for m in modulations.chunk(6, dim=2))  # as above
    states = []
    for k in range(K):
        x = x + g1[k].unsqueeze(1) * attention(modulated(x, sh1[k], sc1[k], eps))
        x = x + g2[k].unsqueeze(1) * mlp(modulated(x, sh2[k], sc2[k], mlp_norm_eps))
        if k in kept:
            states.append(x)
    head_input = None if head is None else modulated(x, head[0], head[1], eps)
    return x, head_input, states
