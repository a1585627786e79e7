"""`fuse` on PixArt-alpha/sigma (`PixArtTransformer2DModel`: ada_norm_single blocks, a per-block
scale-shift table, cross-attention to the text between the self-attention and the MLP),
compared with the unfused model. Built from small configs with random weights (nothing
downloaded). On the parent commit PixArt was refused."""

import copy
import warnings

import pytest
import torch
from conftest import assert_close_rel
from fused_vs_unfused import assert_same_outputs_and_gradients

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")

from onestep_kernels.integrations import diffusers as integration
from onestep_kernels.integrations.diffusers import fuse


def make_pixart(generator, num_layers=2, heads=3, head_dim=8, caption_channels=16):
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=num_layers, patch_size=2, attention_head_dim=head_dim,
        num_attention_heads=heads, in_channels=4, out_channels=8,
        cross_attention_dim=heads * head_dim, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=8, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        caption_channels=caption_channels).eval()
    with torch.no_grad():
        for p in model.parameters():  # (zero-initialised parts would hide the blocks)
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def pixart_inputs(generator, batch=3, text_tokens=5, caption_channels=16):
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
            "timestep": torch.tensor([3.0, 400.0, 900.0])[:batch],
            "encoder_hidden_states": torch.randn(batch, text_tokens, caption_channels,
                                                 generator=generator),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def test_pixart_fused_matches_unfused_outputs_and_gradients(generator, monkeypatch):
    model = make_pixart(generator)
    inputs = pixart_inputs(generator)
    fused = fuse(copy.deepcopy(model))
    assert all(integration.check_block(b, "") == "ada_norm_single"
               for b in fused.transformer_blocks)
    calls = []  # the fused path runs, with the cross-attention between the two halves
    block_forward = integration.dit_block_forward
    monkeypatch.setattr(integration, "dit_block_forward", lambda *a, **k: calls.append(
        k["cross_attention"] is not None) or block_forward(*a, **k))
    assert_same_outputs_and_gradients(model, fused, inputs, "PixArt")
    assert calls == [True, True]


def test_pixart_with_a_text_mask_and_no_text_projection(generator):
    model = make_pixart(generator, caption_channels=None)
    inputs = pixart_inputs(generator, caption_channels=24)  # (the blocks' width: no projection)
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1],
                                                     [1, 0, 0, 0, 0]])
    with torch.no_grad():
        ref = model(**inputs).sample
        out = fuse(copy.deepcopy(model))(**inputs).sample
    assert_close_rel(out, ref, torch.float32, "fused PixArt output with a text mask")


def test_pixart_blocks_take_diffusers_path_when_their_norms_are_hooked(generator):
    model = make_pixart(generator)
    fused = fuse(copy.deepcopy(model))
    inputs = pixart_inputs(generator)
    outputs = []
    for m in (model, fused):
        for block in m.transformer_blocks:
            block.norm2.register_forward_hook(lambda mod, args, out: out * 0.5)
        with torch.no_grad():
            outputs.append(m(**inputs).sample)
    assert all(integration.module_path_reason(b) for b in fused.transformer_blocks)
    assert torch.equal(outputs[1], outputs[0])


def test_pixart_under_bf16_autocast(generator):
    model = make_pixart(generator)
    fused = fuse(copy.deepcopy(model))
    inputs = pixart_inputs(generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(**inputs).sample, fused(**inputs).sample
    assert out.dtype == ref.dtype
    assert_close_rel(out.float(), ref.float(), torch.bfloat16, "autocast PixArt output")


def test_strict_false_fuses_what_it_can_and_names_the_rest(generator):
    model = make_pixart(generator, num_layers=3)
    model.transformer_blocks[1].ff.net[1].p = 0.1
    with pytest.raises(ValueError, match="block 1 cannot be fused: its feed-forward has dropout"):
        fuse(model)
    assert not integration.is_fused(model)  # strict: nothing changed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fuse(model, strict=False)
    assert [str(w.message) for w in caught] == [
        "fuse: 1 of 3 blocks left unfused: block 1: its feed-forward has dropout"]
    fused = [isinstance(b.__dict__.get("forward"), integration.FusedForward)
             for b in model.transformer_blocks]
    assert fused == [True, False, True]
