"""diffusers' DiT-family transformers at their real widths, two blocks of each kind, with
inputs and the blocks' matrix-product FLOPs: what `benchmarks/test_diffusers_models.py` (CPU,
fp32) and gpu_check's `diffusers` row (bf16) time fused against unfused. Random weights;
nothing downloaded. `small=True` builds the same structures at toy widths (the smoke pass).

    DiT-XL/2   1152, 16 heads of 72, 256 image tokens
    PixArt-a   the same, 120 text tokens (cross-attention)
    SD3-medium 1536, 24 heads of 64, 256 image + 77 text tokens (the second block the last's kind)
    Flux       3072, 24 heads of 128, 256 image + 64 text tokens (2 double-, 2 single-stream)
"""

from __future__ import annotations

import torch

MODEL_CLASSES = ("DiT", "PixArt", "SD3", "Flux")
TOKENS = 256
SIZES = {"DiT": (1152, 16, 0), "PixArt": (1152, 16, 120), "SD3": (1536, 24, 77),
         "Flux": (3072, 24, 64)}  # (width, heads, text tokens)
SMALL = {"DiT": (32, 2, 0), "PixArt": (32, 2, 6), "SD3": (32, 2, 5), "Flux": (32, 2, 4)}


def make(model_class: str, batch: int = 1, small: bool = False,
         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, its inputs) for `batch` samples of TOKENS image tokens (16 with
    `small`)."""
    import diffusers

    D, heads, text = (SMALL if small else SIZES)[model_class]
    side = 4 if small else 16  # latent tokens per side after patching
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    t = torch.full((batch,), 0.5 if model_class == "Flux" else 500.0)
    if model_class == "Flux":
        text_width, pooled = (16, 8) if small else (4096, 768)
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4 if small else 64, num_layers=2, num_single_layers=2,
            attention_head_dim=D // heads, num_attention_heads=heads,
            joint_attention_dim=text_width, pooled_projection_dim=pooled,
            axes_dims_rope=[4, 4, 8] if small else [16, 56, 56])
        inputs = {"hidden_states": torch.randn(batch, side * side, 4 if small else 64,
                                               generator=g),
                  "encoder_hidden_states": torch.randn(batch, text, text_width, generator=g),
                  "pooled_projections": torch.randn(batch, pooled, generator=g), "timestep": t,
                  "img_ids": torch.randn(side * side, 3, generator=g),
                  "txt_ids": torch.zeros(text, 3)}
    elif model_class == "SD3":
        text_width, pooled = (16, 8) if small else (4096, 2048)
        model = diffusers.SD3Transformer2DModel(
            sample_size=2 * side, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=D // heads, num_attention_heads=heads, caption_projection_dim=D,
            joint_attention_dim=text_width, pooled_projection_dim=pooled,
            pos_embed_max_size=96)
        inputs = {"hidden_states": torch.randn(batch, 16, 2 * side, 2 * side, generator=g),
                  "encoder_hidden_states": torch.randn(batch, text, text_width, generator=g),
                  "pooled_projections": torch.randn(batch, pooled, generator=g), "timestep": t}
    else:
        common = dict(num_layers=2, num_attention_heads=heads, attention_head_dim=D // heads,
                      in_channels=4, out_channels=8, sample_size=2 * side, patch_size=2,
                      num_embeds_ada_norm=1000)
        x = torch.randn(batch, 4, 2 * side, 2 * side, generator=g)
        if model_class == "DiT":
            model = diffusers.DiTTransformer2DModel(**common)
            inputs = {"hidden_states": x, "timestep": t,
                      "class_labels": torch.arange(batch) % 1000}
        else:
            model = diffusers.PixArtTransformer2DModel(
                **common, cross_attention_dim=D, attention_bias=True,
                activation_fn="gelu-approximate", norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
                caption_channels=D)
            inputs = {"hidden_states": x, "timestep": t,
                      "encoder_hidden_states": torch.randn(batch, text, D, generator=g),
                      "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        for p in model.parameters():  # (adaLN-Zero's zeros would make the blocks trivial)
            p.normal_(0, 0.02)
    model = model.to(device, dtype).eval()
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype)
              if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model, inputs


def block_flops(model_class: str, batch: int = 1, small: bool = False) -> int:
    """Matrix-product FLOPs of the two blocks of each kind, forward (attention's two products
    included)."""
    D, _, C = (SMALL if small else SIZES)[model_class]
    T = 16 if small else TOKENS
    if model_class == "Flux":  # double-stream blocks as SD3's; single: qkv 3D and an MLP 4D
        attention = 2 * 2 * (T + C) ** 2 * D  # in parallel, out (D + 4D) -> D
        double = 2 * (T + C) * D * 12 * D + attention
        single = 2 * (T + C) * D * 12 * D + attention
        return batch * (2 * double + 2 * single)
    if model_class == "SD3":  # joint attention over both streams (all queries, both blocks);
        attention = 2 * 2 * (T + C) ** 2 * D  # the second block's text stream only feeds it
        first = 2 * (T + C) * D * 12 * D + attention
        last = 2 * T * D * 12 * D + 2 * C * D * 3 * D + attention
        return batch * (first + last)
    per_block = 2 * T * D * 12 * D + 2 * 2 * T * T * D
    if model_class == "PixArt":  # cross-attention: q and out on the image, k and v on the text
        per_block += 2 * T * D * 2 * D + 2 * C * D * 2 * D + 2 * 2 * T * C * D
    return batch * 2 * per_block
