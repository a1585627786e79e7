"""`fuse` on SD3 and SD3.5 (`SD3Transformer2DModel`: JointTransformerBlocks, two token streams
around one joint attention; SD3.5's dual-attention blocks and RMS-normalised q, k), compared
with the unfused model. Small configs with random weights (nothing downloaded). On the parent
commit SD3 was refused."""

import copy

import pytest
import torch
from conftest import assert_close_rel
from fused_vs_unfused import assert_same_outputs_and_gradients, count_module_calls

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")

from onestep_kernels.integrations import diffusers as integration  # noqa: E402
from onestep_kernels.integrations.diffusers import fuse  # noqa: E402


def make_sd3(generator, dual_attention_layers=(), qk_norm=None, num_layers=3, heads=4,
             head_dim=8):
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads,
        caption_projection_dim=heads * head_dim, joint_attention_dim=16,
        pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for p in model.parameters():  # (zero-initialised gates would hide the blocks)
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def sd3_inputs(generator, batch=2, text_tokens=7):
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, 16, generator=generator),
            "pooled_projections": torch.randn(batch, 12, generator=generator),
            "timestep": torch.tensor([10.0, 700.0])[:batch]}


@pytest.mark.parametrize("variant", ["SD3", "SD3.5 (dual attention, RMS q/k norm)"])
def test_sd3_fused_matches_unfused_outputs_and_gradients(generator, monkeypatch, variant):
    kwargs = {} if variant == "SD3" else {"dual_attention_layers": (0, 1), "qk_norm": "rms_norm"}
    model = make_sd3(generator, **kwargs)
    inputs = sd3_inputs(generator)
    fused = fuse(copy.deepcopy(model))
    assert [integration.check_block(b, "") for b in fused.transformer_blocks] == ["joint"] * 3
    assert fused.transformer_blocks[-1].context_pre_only  # (the last block: context feeds only)
    tails = []  # the fused path runs: two streams per block, one in the last
    tail = integration.dit_block_tail
    monkeypatch.setattr(integration, "dit_block_tail",
                        lambda *a, **k: tails.append(1) or tail(*a, **k))
    # (the last block's context-only parameters get no gradient, fused or not)
    assert_same_outputs_and_gradients(model, fused, inputs, variant)
    assert len(tails) == 5


def test_sd3_under_bf16_autocast(generator):
    model = make_sd3(generator)
    fused = fuse(copy.deepcopy(model))
    inputs = sd3_inputs(generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(**inputs).sample, fused(**inputs).sample
    assert out.dtype == ref.dtype
    assert_close_rel(out.float(), ref.float(), torch.bfloat16, "autocast SD3 output")


def test_sd3_hooks_fire_as_often_as_unfused_and_chunking_applies(generator):
    model = make_sd3(generator)
    fused = fuse(copy.deepcopy(model))
    inputs = sd3_inputs(generator)
    counts, outputs = [], []
    for m in (model, fused):
        counts.append(count_module_calls(m))
        with torch.no_grad():
            outputs.append(m(**inputs).sample)
    assert counts[1] == counts[0] and counts[0]["transformer_blocks.0.ff_context"] == 1
    assert torch.equal(outputs[1], outputs[0])  # (hooks everywhere: diffusers' own path)
    plain = make_sd3(torch.Generator().manual_seed(1))
    inputs = sd3_inputs(generator, text_tokens=8)  # (chunks of 4 tokens in both streams)
    chunked = fuse(copy.deepcopy(plain))
    for block in chunked.transformer_blocks:
        block.set_chunk_feed_forward(4, dim=1)
    with torch.no_grad():
        assert_close_rel(chunked(**inputs).sample, plain(**inputs).sample, torch.float32,
                         "chunked feed-forward")


def test_a_joint_block_with_an_affine_or_fp32_norm_is_refused_by_name(generator):
    model = make_sd3(generator)
    block = model.transformer_blocks[0]
    block.norm2 = torch.nn.LayerNorm(32, elementwise_affine=True)
    with pytest.raises(ValueError, match="block 0 cannot be fused: its norm2 and norm2_context "
                                         "are not LayerNorms without affine parameters"):
        fuse(model)
    assert not integration.is_fused(model)
