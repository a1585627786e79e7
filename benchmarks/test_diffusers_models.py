"""diffusers' DiT-family transformers fused by `onestep_kernels.integrations.diffusers.fuse`,
against the same model unfused (eager) and its torch.compile, in one run: fp32 on the CPU,
batch 1, two blocks at each model's real width and head count (DiT-XL/2: 1152, 16 heads of 72,
256 image tokens; PixArt-alpha: the same with 120 text tokens; SD3-medium: 1536, 24 heads of
64, 256 image and 77 text tokens, its second block the last one's kind, whose text stream only
feeds the attention; Flux: 3072, 24 heads of 128, 256 image and 64 text tokens, two
double-stream and two single-stream blocks, about 4 GB of weights), forward under no_grad.

Rates are GFLOP/s of the blocks' matrix products (attention's two products included), next to
the SGEMM ceiling of the same run. Random weights; nothing downloaded.

    pytest benchmarks/test_diffusers_models.py
"""

import copy

import pytest
import torch
from conftest import measure_sgemm_ceiling

diffusers = pytest.importorskip("diffusers")

from onestep_kernels.integrations.diffusers import fuse  # noqa: E402

D, HEADS, HEAD_DIM, TOKENS, TEXT = 1152, 16, 72, 256, 120
SD3_D, SD3_HEADS, SD3_TEXT = 1536, 24, 77
FLUX_D, FLUX_HEADS, FLUX_TEXT = 3072, 24, 64


def make(model_class: str):
    """(model with two blocks, its inputs) at the model's real width; 32 x 32 latents with
    patch 2 make 256 image tokens."""
    torch.manual_seed(0)
    common = dict(num_layers=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                  in_channels=4, out_channels=8, sample_size=32, patch_size=2)
    x = torch.randn(1, 4, 32, 32)
    if model_class == "Flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
            attention_head_dim=FLUX_D // FLUX_HEADS, num_attention_heads=FLUX_HEADS,
            joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
        inputs = {"hidden_states": torch.randn(1, TOKENS, 64),
                  "encoder_hidden_states": torch.randn(1, FLUX_TEXT, 4096),
                  "pooled_projections": torch.randn(1, 768), "timestep": torch.tensor([0.5]),
                  "img_ids": torch.randn(TOKENS, 3), "txt_ids": torch.zeros(FLUX_TEXT, 3)}
    elif model_class == "SD3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=SD3_D // SD3_HEADS, num_attention_heads=SD3_HEADS,
            caption_projection_dim=SD3_D, joint_attention_dim=4096, pooled_projection_dim=2048,
            pos_embed_max_size=96)
        inputs = {"hidden_states": torch.randn(1, 16, 32, 32),
                  "encoder_hidden_states": torch.randn(1, SD3_TEXT, 4096),
                  "pooled_projections": torch.randn(1, 2048), "timestep": torch.tensor([500.0])}
    elif model_class == "DiT":
        model = diffusers.DiTTransformer2DModel(**common, num_embeds_ada_norm=1000)
        inputs = {"hidden_states": x, "timestep": torch.tensor([500.0]),
                  "class_labels": torch.tensor([7])}
    else:
        model = diffusers.PixArtTransformer2DModel(
            **common, cross_attention_dim=D, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            use_additional_conditions=False, caption_channels=D)
        inputs = {"hidden_states": x, "timestep": torch.tensor([500.0]),
                  "encoder_hidden_states": torch.randn(1, TEXT, D),
                  "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        for p in model.parameters():  # (adaLN-Zero's zeros would make the blocks trivial)
            p.normal_(0, 0.02)
    return model.eval(), inputs


def block_flops(model_class: str) -> int:
    """Matrix-product FLOPs of the two blocks' forward at batch 1."""
    T = TOKENS
    if model_class == "Flux":  # two double-stream blocks (as SD3's), two single-stream
        F, C = FLUX_D, FLUX_TEXT  # (qkv 3F, MLP 4F in parallel, out (F + 4F) -> F)
        attention = 2 * 2 * (T + C) ** 2 * F
        double = 2 * (T + C) * F * (3 * F + F + 8 * F) + attention
        single = 2 * (T + C) * F * (3 * F + 4 * F + 5 * F) + attention
        return 2 * double + 2 * single
    if model_class == "SD3":  # joint attention over both streams; the second block's text
        D3, C = SD3_D, SD3_TEXT  # stream has no output projection and no MLP
        attention = 2 * 2 * (T + C) ** 2 * D3  # (the last block's too: all queries computed)
        first = 2 * (T + C) * D3 * (3 * D3 + D3 + 8 * D3) + attention
        last = 2 * T * D3 * 12 * D3 + 2 * C * D3 * 3 * D3 + attention
        return first + last
    per_block = 2 * T * D * (3 * D + D + 4 * D + 4 * D) + 2 * 2 * T * T * D
    if model_class == "PixArt":  # cross-attention: q and out on the image, k and v on the text
        per_block += 2 * T * D * 2 * D + 2 * TEXT * D * 2 * D + 2 * 2 * T * TEXT * D
    return 2 * per_block


@pytest.mark.parametrize("model_class", ["DiT", "PixArt", "SD3", "Flux"])
@pytest.mark.parametrize("contender", ["eager", "torch.compile", "onestep"])
def test_diffusers_model(benchmark, record, model_class, contender):
    model, inputs = make(model_class)
    with torch.no_grad():
        expected = model(**inputs).sample
    if contender == "onestep":
        model = fuse(copy.deepcopy(model))
    elif contender == "torch.compile":
        model = torch.compile(model)

    def step():
        with torch.no_grad():
            return model(**inputs).sample

    torch.testing.assert_close(step(), expected, rtol=1e-3, atol=1e-3)
    benchmark.group = f"diffusers {model_class}"
    benchmark(step)
    width = {"SD3": SD3_D, "Flux": FLUX_D}.get(model_class, D)
    record(f"diffusers {model_class}, 2 blocks of D={width}, batch 1, fp32", contender,
           block_flops(model_class), "GFLOP/s")


def test_sgemm_ceiling(benchmark, record):
    measure_sgemm_ceiling(benchmark, record)
