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

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .ops.attention import attention
from .ops.bias_gelu_tanh import bias_gelu_tanh
from .ops.fused_linear import fused_linear
from .ops.gated_residual_layernorm_modulate import gated_residual_layernorm_modulate
from .ops.layernorm_modulate import layernorm_modulate

LN_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with the reference's parameters: qkv (with bias) and proj."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide hidden_size {hidden_size}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3,
                            h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


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
    """DiTBlock on onestep's fused ops; same parameters, same results within tolerance.

    Memory-bound steps fused: the first modulated LayerNorm is one op, the attention branch's
    gated residual and the second modulated LayerNorm are one op, fc1's bias and GELU are one
    op, the MLP's gated residual is one `addcmul`. Attention is onestep's (flash attention in
    Triton on the GPU, reading q, k, v straight from the QKV projection; onestep's C++ kernel
    on the CPU); the matrix products are PyTorch's.

    fuse_linears=True folds those steps into the four matrix products instead
    (`onestep_kernels.fused_linear`: the modulated LayerNorms in the prologues of QKV and fc1,
    GELU in fc1's epilogue, the gated residuals in the epilogues of proj and fc2), in one
    Triton kernel each for inference; under autograd, and where Triton does not run, the same
    steps run as separate ops. Off by default: whether it pays on a GPU is not measured yet.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 mlp_norm_eps: float = LN_EPS, fuse_linears: bool = False):
        super().__init__(hidden_size, num_heads, mlp_ratio, mlp_norm_eps)
        self.fuse_linears = fuse_linears

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if self.fuse_linears:
            return self._forward_fused_linears(x, c)
        x = x.contiguous()  # the fused ops read rows with unit stride (a no-op when it is)
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.qkv(layernorm_modulate(x, sh1, sc1, LN_EPS))
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3,
                            h=self.attn.num_heads)
        attn = self.attn.proj(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))
        x, h = gated_residual_layernorm_modulate(x, attn, g1, sh2, sc2, self.mlp_norm_eps)
        hidden = bias_gelu_tanh(F.linear(h, self.mlp.fc1.weight), self.mlp.fc1.bias)
        return torch.addcmul(x, g2.unsqueeze(1), self.mlp.fc2(hidden))

    def _forward_fused_linears(self, x: Tensor, c: Tensor) -> Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv, proj = self.attn.qkv, self.attn.proj
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        q, k, v = rearrange(fused_linear(x, qkv.weight, qkv.bias, shift=sh1, scale=sc1,
                                         eps=LN_EPS),
                            "b n (three h d) -> three b h n d", three=3, h=self.attn.num_heads)
        attn = rearrange(attention(q, k, v), "b h n d -> b n (h d)")
        x = fused_linear(attn, proj.weight, proj.bias, gate=g1, residual=x)
        hidden = fused_linear(x, fc1.weight, fc1.bias, shift=sh2, scale=sc2,
                              eps=self.mlp_norm_eps, activation="gelu_tanh")
        return fused_linear(hidden, fc2.weight, fc2.bias, gate=g2, residual=x)
