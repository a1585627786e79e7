"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"), architecture-exact.

Same module tree and parameter names as the official code (x_embedder.proj, t_embedder.mlp,
y_embedder.embedding_table, pos_embed, blocks.i.{attn,mlp,adaLN_modulation}, final_layer), so
official checkpoints load with `load_state_dict(strict=True)`; DiT-XL/2 at 256x256 has
675,129,632 parameters counting the frozen positional embedding. `fused=True` swaps every block
for `onestep_kernels.layers.FusedDiTBlock` (the state_dict does not change).

Differences from the official code, all opt-in: `num_classes=0` builds an unconditional model
(no label embedder; `y` is ignored); `forward_with_cfg(..., cfg_channels=None)` guides all
channels (the official default, kept here, guides the first three); and two settings that
`DiT.from_diffusers` uses to reproduce diffusers' `DiTTransformer2DModel` exactly, whose
sinusoidal timestep frequencies divide by (128 - 1) instead of 128 (`timestep_freq_shift=1`)
and whose second LayerNorm in each block uses eps 1e-5 (`mlp_norm_eps`).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from onestep_kernels import layernorm_modulate
from onestep_kernels.errors import ArgumentError, ArgumentTypeError
from onestep_kernels.layers import LN_EPS, DiTBlock, FusedDiTBlock


def sincos_2d_pos_embed(dim: int, grid_size: int) -> Tensor:
    """The frozen 2-D sin-cos positional embedding of the official code (MAE's recipe):
    (grid_size**2, dim), first half from the column index, second half from the row index."""
    if dim % 4:
        raise ArgumentError(f"hidden_size: must be a multiple of 4 for the 2-D sin-cos embedding, "
                            f"got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens (a strided convolution named `proj`)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ArgumentError(f"patch_size: {patch_size} does not divide input_size {input_size}")
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the timestep as given (256 frequencies), then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256,
                 freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0,
                           freq_shift: int = 0) -> Tensor:
        half = dim // 2
        # Built on t's device (no host tensor, no copy: a forward can be captured in a CUDA
        # graph), in fp32 whatever the model's dtype.
        freqs = torch.exp(-math.log(max_period)
                          * torch.arange(half, dtype=torch.float32, device=t.device)
                          / (half - freq_shift))
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size,
                                       freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; label `num_classes` is the null class used for classifier-free
    guidance, and labels are dropped to it with probability `dropout_prob` in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then the linear projection to patches; `fused` runs the norm as
    onestep's layernorm_modulate."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int,
                 fused: bool = False):
        super().__init__()
        self.fused = fused
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        if self.fused:
            x = layernorm_modulate(x.contiguous(), shift, scale, LN_EPS)
        else:
            x = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=LN_EPS)
            x = x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return self.linear(x)


def check_labels(y: Tensor, embedder: LabelEmbedder, num_classes: int) -> None:
    """Labels in 0..num_classes, num_classes being the null class where the model has one
    (class_dropout_prob > 0), else in 0..num_classes - 1. On the CPU a plain check; on a
    GPU an asynchronous device-side assert (no host sync: forwards stay CUDA-graph safe);
    the meta device has no values to check."""
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ArgumentTypeError(f"y: expected integer labels, got {y.dtype}")
    top = embedder.embedding_table.num_embeddings - 1
    allowed = f"0..{top}" + (f" ({top} is the null class)" if top == num_classes
                             else " (this model has no null class)")
    if y.device.type == "cpu":
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > top):
            raise ArgumentError(f"y: labels must be in {allowed}, "
                                f"got {int(y.min())}..{int(y.max())}")
    elif y.is_cuda:
        torch._assert_async(((y >= 0) & (y <= top)).all(), f"y: labels must be in {allowed}")


class DiT(nn.Module):
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, fused: bool = False,
                 timestep_freq_shift: int = 0, mlp_norm_eps: float = LN_EPS):
        super().__init__()
        if num_classes < 0:
            raise ArgumentError(f"num_classes: expected >= 0 (0 = unconditional), got "
                                f"{num_classes}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.fused = fused
        self.input_size = input_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
                           if num_classes > 0 else None)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        block = FusedDiTBlock if fused else DiTBlock
        self.blocks = nn.ModuleList(block(hidden_size, num_heads, mlp_ratio, mlp_norm_eps)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, fused)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: xavier-uniform linears with zero bias, the patch
        projection like a linear, N(0, 0.02) label and timestep embeddings, and zero adaLN
        modulation and final layer (adaLN-Zero: every block starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_2d_pos_embed(self.pos_embed.shape[-1], grid)[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) tokens → (B, C, H, W) images."""
        side = int(x.shape[1] ** 0.5)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=side, w=side,
                         p=self.patch_size, q=self.patch_size)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) latents or images; t: (B,) timesteps, passed to the sinusoidal
        embedder as given; y: (B,) int64 labels (ignored when num_classes == 0). In training
        mode labels are dropped to the null class with `class_dropout_prob`, as officially."""
        return self._forward(x, t, y, drop_labels=self.training)

    def _forward(self, x: Tensor, t: Tensor, y: Tensor | None, drop_labels: bool) -> Tensor:
        side = self.input_size
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, side, side):
            raise ArgumentError(f"x: expected (B, {self.in_channels}, {side}, {side}), got "
                                f"{tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ArgumentError(f"t: expected shape ({x.shape[0]},), got {tuple(t.shape)}")
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None or y.shape != (x.shape[0],):
                raise ArgumentError(f"y: expected ({x.shape[0]},) labels for a class-conditional "
                                    f"DiT, got {None if y is None else tuple(y.shape)}")
            self._check_labels(y)
            c = c + self.y_embedder(y, drop_labels)
        h = (self.x_embedder(x) + self.pos_embed).contiguous()  # tokens as rows of hidden_size
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def _check_labels(self, y: Tensor) -> None:
        check_labels(y, self.y_embedder, self.num_classes)

    @classmethod
    def from_diffusers(cls, model, fused: bool = True) -> "DiT":
        """A DiT with the weights of a diffusers `DiTTransformer2DModel` (same outputs)."""
        from onestep_models.diffusers_dit import dit_config, dit_state_dict

        dit = cls(**dit_config(model), fused=fused)
        dit.load_state_dict(dit_state_dict(model), strict=True)
        return dit.to(next(model.parameters()).dtype)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float,
                         cfg_channels: int | None = 3) -> Tensor:
        """Classifier-free guidance, as in the official code: the batch's second half carries
        the null label; guidance is applied to the first `cfg_channels` output channels (3, the
        official default; None for all) and both halves get the guided result."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        channels = out.shape[1] if cfg_channels is None else cfg_channels
        eps, rest = out[:, :channels], out[:, channels:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class FlowDiT(DiT):
    """A DiT as a flow-matching network f(x, t, y) with t in [0, 1] (onestep's convention,
    see `onestep_models.flow`): t is multiplied by `time_scale` before the sinusoidal embedder
    (1000, the range DiT's embedding frequencies were designed for; at t in [0, 1] most of
    them would barely move), and with `learn_sigma` only the first `in_channels` output
    channels are returned. Labels are never dropped inside: recipes drop them with their own
    seeded generator (`flow.drop_labels`) so that a run is reproducible. Same state_dict as
    `DiT`."""

    def __init__(self, *args, time_scale: float = 1000.0, **kwargs):
        kwargs.setdefault("learn_sigma", False)
        super().__init__(*args, **kwargs)
        self.time_scale = float(time_scale)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = self._forward(x, t * self.time_scale, y, drop_labels=False)
        return out[:, : self.in_channels]


def _size(depth: int, hidden_size: int, num_heads: int):
    def make(patch_size: int):
        def build(**kwargs) -> DiT:
            return DiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size,
                       num_heads=num_heads, **kwargs)
        return build
    return make


# The DiT sizes, declared once: name -> (depth, hidden size, heads).
DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
_SIZES = {name: _size(*dims) for name, dims in DIT_SIZES.items()}

# "DiT-XL/2" → constructor, as in the official code.
DiT_models = {f"DiT-{name}/{p}": make(p) for name, make in _SIZES.items() for p in (2, 4, 8)}
