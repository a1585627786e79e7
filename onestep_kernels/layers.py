"""DiT blocks as nn.Modules: the reference `DiTBlock` (adaLN-Zero, as in the DiT paper's code)
and `FusedDiTBlock`, its drop-in replacement on onestep's fused ops.

Both have the reference's submodule and parameter names (`attn.qkv`, `attn.proj`, `mlp.fc1`,
`mlp.fc2`, `adaLN_modulation.1`), so a state_dict moves between them and official DiT
checkpoints load into either.

    from onestep_kernels.layers import FusedDiTBlock
    block = FusedDiTBlock(hidden_size=1152, num_heads=16)
    block.load_state_dict(reference_block.state_dict())
    x = block(x, c)        # x: (B, N, hidden), c: (B, hidden) conditioning
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import block_nodes, checks
from .errors import ArgumentError
from .op_spec import needs_grad
from .ops import attention as attention_op
from .ops import fused_linear as fused_linear_op
from .ops import gated_residual_layernorm_modulate as gated_op
from .ops import layernorm_modulate as layernorm_modulate_op
from .torch_compat import bare_linear, child, linear_gelu_tanh, linear_parameters

ATTENTION, GATED, LAYERNORM = attention_op.OP, gated_op.OP, layernorm_modulate_op.OP

LN_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with the reference's parameters: qkv (with bias) and proj.
    `fused=False` runs PyTorch's SDPA (the reference); `fused=True` runs onestep's attention
    op on q, k, v views of the QKV projection."""

    def __init__(self, hidden_size: int, num_heads: int, fused: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise ArgumentError(f"num_heads: {num_heads} does not divide hidden_size "
                                f"{hidden_size}")
        self.num_heads = num_heads
        self.fused = fused
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            out = _attention(*split_heads_packed_grad(self.qkv(x), self.num_heads))
        else:
            out = F.scaled_dot_product_attention(*split_heads(self.qkv(x), self.num_heads))
        return self.proj(merge_heads(out))


# The head split and merge as views and one reshape, as the official DiT (timm's Attention)
# writes them: einops' rearrange does the same at 6-7 µs of host time per call against 2.5-4
# (dev VM), and a DiT-XL/2 forward makes 56 of them.


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3 H Dh) -> q, k, v, each (B, H, N, Dh): "b n (three h d) -> three b h n d"
    (views of the projection when it is contiguous)."""
    B, N, width = qkv.shape
    heads = qkv.reshape(B, N, 3, num_heads, width // (3 * num_heads))
    return heads.permute(2, 0, 3, 1, 4).unbind(0)


def split_heads_packed_grad(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The same views as split_heads, taken in the other order (unbind the three, then move
    the heads forward), so that their backward writes the projection's gradient in one pass:
    autograd stacks dq, dk and dv into a contiguous (B, N, 3, H, Dh), a view of (B, N, 3 D).
    split_heads' backward stacks them as (3, B, H, N, Dh), then copies that once more into
    the projection's layout: a second pass over 3 B N D elements (at DiT-XL/2, B=32, ~57 MB
    read and written)."""
    B, N, width = qkv.shape
    heads = qkv.reshape(B, N, 3, num_heads, width // (3 * num_heads))
    q, k, v = heads.unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def merge_heads(out: Tensor) -> Tensor:
    """(B, H, N, Dh) -> (B, N, H Dh): "b h n d -> b n (h d)"."""
    B, H, N, Dh = out.shape
    return out.transpose(1, 2).reshape(B, N, H * Dh)


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """onestep's attention on views of one projection (one dtype, validated by construction;
    q, k and v require gradients together)."""
    dtype = q.dtype
    if checks.any_autocast():
        dtype = checks.compute_dtype(checks.LOWER, (q,))
        if q.dtype is not dtype:
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    Dh = q.shape[-1]
    grad = needs_grad(q)
    return ATTENTION.apply(ATTENTION.resolve(None, q.device, dtype, Dh, grad), q, k, v,
                           Dh ** -0.5, grad=grad)


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2, the reference DiT MLP."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, bias=True)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _gelu_epilogue(h: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether fc1's bias and GELU(tanh) run in cuBLASLt's epilogue (torch_compat's
    linear_gelu_tanh):
    inference on CUDA in fp16/bf16 without autocast. On an H100 (bf16, (8192, 1152) x (1152,
    4608), 2026-11-25, benchmarks/profile_block.py) it took 0.166 ms against 0.209 for the
    product then onestep's Triton bias_gelu_tanh and 0.233 for PyTorch's Linear and GELU, and
    rounds once (rel. error 1.7e-3 against 2.5e-3). On the CPU the same call computes the erf
    GELU, and it has no backward: elsewhere the separate op runs."""
    return (h.is_cuda and h.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == h.dtype and bias.dtype == h.dtype
            and not needs_grad(h, weight, bias)
            and not checks.autocast_enabled(h.device.type))


def dit_block_forward(x: Tensor, modulation: Tensor, attention: Callable[[Tensor], Tensor],
                      fc1: nn.Module, fc2: nn.Module, *, eps: float = LN_EPS,
                      mlp_norm_eps: float = LN_EPS, fuse_linears: bool = False,
                      cross_attention: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """One adaLN-Zero DiT block on onestep's fused ops, for any module that has one:

        (sh1, sc1, g1, sh2, sc2, g2) = modulation.chunk(6)
        x = x + g1 * attention(LN(x) * (1 + sc1) + sh1)
        x = x + cross_attention(x)                        (only where given: PixArt's blocks)
        x = x + g2 * fc2(GELU_tanh(fc1(LN(x) * (1 + sc2) + sh2)))

    x: (B, N, D). modulation: (B, 6 D), the adaLN projection of the conditioning.
    attention: the attention branch, from the modulated tokens to its output before the gate
        (onestep's `Attention`, diffusers' `attn1`, ...). fc1, fc2: the MLP's linear modules.
    eps, mlp_norm_eps: the two LayerNorms' epsilons.
    cross_attention: PixArt's ungated cross-attention branch between the two (its residual and
        the second modulated LayerNorm are then one op, with a gate of ones).
    fuse_linears: fold the LayerNorms, GELU and gated residuals into the four products with
        `fused_linear` where its default backend is the fused kernel (inference) and every
        linear is a bare nn.Linear.

    The modules are called as modules, so hooks, adapters (LoRA) and casting wrappers on them
    apply; what lies between them is fused. fc1's bias joins the GELU in one op only when fc1
    is a bare nn.Linear. The arguments are validated here once; the ops inside run their
    inner layers. Under autocast the steps follow the reference block's expressions.
    """
    if isinstance(x, Tensor):
        x = x.contiguous()  # the fused ops read rows with unit stride (free when it is)
    checks.tensor("x", x, (3,))
    checks.tensor("modulation", modulation, (2,))
    checks.same_device("modulation", modulation, x, "x")
    B, N, D = x.shape
    if modulation.shape != (B, 6 * D):
        raise ArgumentError(f"modulation: expected shape {(B, 6 * D)} for x of shape "
                            f"{tuple(x.shape)}, got {tuple(modulation.shape)}")
    if not (isinstance(eps, float) and 0.0 < eps < math.inf):  # (the usual case, cheaply)
        eps = checks.positive_float("eps", eps)
    if not (isinstance(mlp_norm_eps, float) and 0.0 < mlp_norm_eps < math.inf):
        mlp_norm_eps = checks.positive_float("mlp_norm_eps", mlp_norm_eps)
    if fuse_linears and isinstance(attention, Attention) and cross_attention is None:
        fused = _fused_linears_forward(x, modulation, attention, fc1, fc2, eps, mlp_norm_eps)
        if fused is not None:
            return fused
    device = x.device
    dtype = x.dtype
    if modulation.dtype is not dtype or checks.any_autocast():
        dtype = checks.compute_dtype(checks.LAYER_NORM, (x, modulation))
        x, modulation = checks.cast(x, dtype), checks.cast(modulation, dtype)
    sh1, sc1, g1, sh2, sc2, g2 = modulation.chunk(6, dim=1)
    grad = needs_grad(x, modulation)

    h = LAYERNORM.apply(LAYERNORM.resolve(None, device, dtype, D, grad), x, sh1, sc1, eps,
                        grad=grad)
    if cross_attention is not None:
        x = torch.addcmul(x, g1.unsqueeze(1), checks.cast(attention(h), dtype))
        attention, h, g1 = cross_attention, x, x.new_ones(B, D)
        grad = grad or x.requires_grad
    x, hidden = attention_then_mlp_input(x, h, attention, fc1, g1, sh2, sc2, mlp_norm_eps,
                                         grad)
    return torch.addcmul(x, g2.unsqueeze(1), fc2(hidden))


def dit_block_tail(x: Tensor, branch: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                   mlp_gate: Tensor, fc1: nn.Module, fc2: nn.Module, *,
                   mlp_norm_eps: float = LN_EPS) -> Tensor:
    """The second half of an adaLN-Zero block, from its attention branch's output:

        x = x + gate * branch
        x = x + mlp_gate * fc2(GELU_tanh(fc1(LN(x) * (1 + scale) + shift)))

    for blocks whose attention mixes several token streams (SD3's joint attention, Flux's
    double-stream blocks): each stream's modulated input comes from `layernorm_modulate`, the
    attention runs on all of them, and each stream ends here, its gated residual and modulated
    LayerNorm one op and fc1's bias and GELU one op, as in `dit_block_forward`.
    x, branch: (B, N, D). gate, shift, scale, mlp_gate: (B, D) (views into a wider
    projection are fine).
    """
    if isinstance(x, Tensor):
        x = x.contiguous()
    checks.tensor("x", x, (3,))
    checks.tensor("branch", branch, (3,))
    B, _, D = x.shape
    if branch.shape != x.shape:
        raise ArgumentError(f"branch: expected the shape of x, {tuple(x.shape)}, got "
                            f"{tuple(branch.shape)}")
    modulation = {"gate": gate, "shift": shift, "scale": scale, "mlp_gate": mlp_gate}
    for name, t in modulation.items():
        checks.tensor(name, t, (2,))
        checks.same_device(name, t, x, "x")
        if t.shape != (B, D):
            raise ArgumentError(f"{name}: expected shape {(B, D)} for x of shape "
                                f"{tuple(x.shape)}, got {tuple(t.shape)}")
    if not (isinstance(mlp_norm_eps, float) and 0.0 < mlp_norm_eps < math.inf):
        mlp_norm_eps = checks.positive_float("mlp_norm_eps", mlp_norm_eps)
    dtype = x.dtype
    if any(t.dtype is not dtype for t in modulation.values()) or checks.any_autocast():
        dtype = checks.compute_dtype(checks.LAYER_NORM, (x, *modulation.values()))
        x, gate, shift, scale, mlp_gate = (checks.cast(t, dtype)
                                           for t in (x, gate, shift, scale, mlp_gate))
    grad = needs_grad(x, gate, shift, scale, mlp_gate)
    x, hidden = attention_then_mlp_input(x, branch, _identity, fc1, gate, shift, scale,
                                         mlp_norm_eps, grad)
    return torch.addcmul(x, mlp_gate.unsqueeze(1), fc2(hidden))


def _identity(t: Tensor) -> Tensor:
    return t


def attention_then_mlp_input(x: Tensor, h: Tensor, attention: Callable[[Tensor], Tensor],
                             fc1: nn.Module, gate: Tensor, shift: Tensor, scale: Tensor,
                             eps: float, grad: bool) -> tuple[Tensor, Tensor]:
    """The middle of an adaLN-Zero block, from the attention's modulated input `h` to the MLP's
    activation: (x + gate * attention(h), GELU_tanh(fc1(LN(that) * (1 + scale) + shift))),
    the gated residual and the modulated LayerNorm as one op, fc1's bias and GELU as one op
    (for inference on CUDA in half precision in cuBLASLt's epilogue), and with gradients the
    gated op and a bare fc1 as one autograd node (block_nodes). For arguments validated by the
    caller (dit_block_forward, depth_loop), `grad` whether x or the gates need gradients."""
    D = x.shape[-1]
    dtype = x.dtype
    branch = checks.cast(attention(h), dtype).contiguous()
    grad = grad or branch.requires_grad
    impl = GATED.resolve(None, x.device, dtype, D, grad)
    weight, bias = linear_parameters(fc1) if bare_linear(fc1) else (None, None)
    # With gradients: the gated op and fc1 as one autograd node where it can run
    fused = (block_nodes.gated_mlp_input(x, branch, gate, shift, scale, weight, bias, eps, impl)
             if grad and bias is not None else None)
    if fused is not None:
        return fused
    x, h = GATED.apply(impl, x, branch, gate, shift, scale, eps, grad=grad)
    return x, linear_then_gelu(h, fc1, weight, bias)


def linear_then_gelu(h: Tensor, fc1: nn.Module, weight: Tensor | None = None,
                     bias: Tensor | None = None) -> Tensor:
    """GELU_tanh(fc1(h)) for h (B, N, D): fc1's bias and the GELU one op where fc1 is a bare
    nn.Linear (its weight and bias given, or read here), in cuBLASLt's epilogue for inference
    on CUDA in half precision; fc1 called as a module otherwise."""
    if weight is None and bare_linear(fc1):
        weight, bias = linear_parameters(fc1)
    if bias is None:
        return F.gelu(fc1(h), approximate="tanh")
    if _gelu_epilogue(h, weight, bias):
        B, N, D = h.shape
        return linear_gelu_tanh(h.reshape(B * N, D), weight, bias).view(B, N, -1)
    return block_nodes.linear_bias_gelu(h, weight, bias)


def _fused_linears_forward(x, modulation, attention, fc1, fc2, eps, mlp_norm_eps):
    """The block as four fused_linear calls, or None where the fused kernel would not run."""
    qkv, proj = attention.qkv, attention.proj
    linears = (qkv, proj, fc1, fc2)
    if not all(bare_linear(m) for m in linears) or checks.autocast_enabled(x.device.type):
        return None
    tensors = [x, modulation] + [p for m in linears for p in (m.weight, m.bias) if p is not None]
    if any(t.dtype != x.dtype for t in tensors):
        return None
    impl = fused_linear_op.OP.resolve(None, x.device, x.dtype, x.shape[-1], needs_grad(*tensors))
    if impl.is_expression:
        return None

    def linear(inp, module, shift=None, scale=None, norm_eps=eps, activation=None, gate=None,
               residual=None):
        return fused_linear_op.apply(impl, inp, module.weight, module.bias, shift, scale,
                                     norm_eps, activation, gate, residual)

    sh1, sc1, g1, sh2, sc2, g2 = modulation.chunk(6, dim=1)
    q, k, v = split_heads_packed_grad(linear(x, qkv, shift=sh1, scale=sc1),
                                      attention.num_heads)
    attn = merge_heads(_attention(q, k, v))
    x = linear(attn, proj, gate=g1, residual=x)
    hidden = linear(x, fc1, shift=sh2, scale=sc2, norm_eps=mlp_norm_eps, activation="gelu_tanh")
    return linear(hidden, fc2, gate=g2, residual=x)


class DiTBlock(nn.Module):
    """The reference DiT block, written from its equations with plain PyTorch ops:

        (sh1, sc1, g1, sh2, sc2, g2) = Linear(SiLU(c)).chunk(6)
        x = x + g1 * Attn(LN(x) * (1 + sc1) + sh1)
        x = x + g2 * MLP(LN(x) * (1 + sc2) + sh2)
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 mlp_norm_eps: float = LN_EPS):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp_norm_eps = mlp_norm_eps  # the second LayerNorm's eps (diffusers' DiT uses 1e-5)
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(F.layer_norm(x, x.shape[-1:], eps=LN_EPS),
                                                      sh1, sc1))
        h = _modulate(F.layer_norm(x, x.shape[-1:], eps=self.mlp_norm_eps), sh2, sc2)
        return x + g2.unsqueeze(1) * self.mlp(h)


class FusedDiTBlock(DiTBlock):
    """DiTBlock on onestep's fused ops (`dit_block_forward`); same parameters, same results
    within tolerance.

    Memory-bound steps fused: the first modulated LayerNorm is one op, the attention branch's
    gated residual and the second modulated LayerNorm are one op, fc1's bias and GELU are one
    op (for inference on CUDA in half precision, cuBLASLt's epilogue of fc1's product:
    `_gelu_epilogue`), the MLP's gated residual is one `addcmul`. With gradients, where fc1
    is a bare nn.Linear, the gated op, fc1's bias-free product and the bias+GELU op record one
    autograd node (`onestep_kernels.block_nodes`). Attention is onestep's attention op on q,
    k, v views of the QKV projection, on its default backend (onestep_kernels.preferences);
    the matrix products are PyTorch's, through the Linear modules (fc1's product through its
    parameters where fc1 is a bare nn.Linear).

    fuse_linears=True folds those steps into the four matrix products instead
    (`onestep_kernels.fused_linear`: the modulated LayerNorms in the prologues of QKV and fc1,
    GELU in fc1's epilogue, the gated residuals in the epilogues of proj and fc2) where
    fused_linear's default backend (onestep_kernels.preferences) is its fused kernel and no
    gradient is needed; elsewhere the default path runs.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 mlp_norm_eps: float = LN_EPS, fuse_linears: bool = False):
        super().__init__(hidden_size, num_heads, mlp_ratio, mlp_norm_eps)
        self.attn.fused = True
        self.fuse_linears = fuse_linears

    def _check_conditioning(self, x: Tensor, c: Tensor) -> None:
        if not isinstance(c, Tensor) or c.dim() != 2 or c.shape[1] != self.hidden_size or (
                isinstance(x, Tensor) and x.dim() >= 1 and c.shape[0] != x.shape[0]):
            raise ArgumentError(f"c: expected (B, {self.hidden_size}) conditioning for x of shape "
                                f"{tuple(getattr(x, 'shape', ()))}, got "
                                f"{tuple(getattr(c, 'shape', ())) or type(c).__name__}")

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        self._check_conditioning(x, c)
        mlp = child(self, "mlp")
        return dit_block_forward(x, child(self, "adaLN_modulation")(c), child(self, "attn"),
                                 child(mlp, "fc1"), child(mlp, "fc2"), eps=LN_EPS,
                                 mlp_norm_eps=self.mlp_norm_eps, fuse_linears=self.fuse_linears)
