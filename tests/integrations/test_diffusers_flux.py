"""`fuse` on Flux (`FluxTransformer2DModel`: double-stream blocks like SD3's joint blocks, with
rotary embeddings and RMS-normalised q, k; single-stream blocks with the attention and the MLP
in parallel), compared with the unfused model. Small configs with random weights (nothing
downloaded). On the parent commit Flux was refused."""

import copy

import pytest
import torch
from conftest import assert_close_rel
from fused_vs_unfused import assert_same_outputs_and_gradients, count_module_calls

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")

from onestep_kernels.integrations import diffusers as integration  # noqa: E402
from onestep_kernels.integrations.diffusers import fuse  # noqa: E402


def make_flux(generator, num_layers=2, num_single_layers=2, guidance=False):
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers,
        num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance).eval()
    with torch.no_grad():
        for p in model.parameters():  # (zero-initialised gates would hide the blocks)
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def flux_inputs(generator, batch=2, side=4, text_tokens=6):
    return {"hidden_states": torch.randn(batch, side * side, 4, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, 24, generator=generator),
            "pooled_projections": torch.randn(batch, 20, generator=generator),
            "timestep": torch.tensor([0.1, 0.8])[:batch],
            "img_ids": torch.randn(side * side, 3, generator=generator),
            "txt_ids": torch.randn(text_tokens, 3, generator=generator)}


def test_flux_fused_matches_unfused_outputs_and_gradients(generator, monkeypatch):
    model = make_flux(generator)
    inputs = flux_inputs(generator)
    fused = fuse(copy.deepcopy(model))
    patterns = [integration.check_block(b, "")
                for b in [*fused.transformer_blocks, *fused.single_transformer_blocks]]
    assert patterns == ["flux_double"] * 2 + ["flux_single"] * 2
    calls = []  # the fused paths run: two stream tails per double block, one GELU per single
    for name in ("dit_block_tail", "linear_then_gelu"):
        original = getattr(integration, name)
        monkeypatch.setattr(integration, name, lambda *a, _o=original, _n=name, **k:
                            calls.append(_n) or _o(*a, **k))
    assert_same_outputs_and_gradients(model, fused, inputs, "Flux")
    assert sorted(calls) == ["dit_block_tail"] * 4 + ["linear_then_gelu"] * 2


def test_flux_under_bf16_autocast_and_in_float64(generator):
    model = make_flux(generator)
    fused = fuse(copy.deepcopy(model))
    inputs = flux_inputs(generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(**inputs).sample, fused(**inputs).sample
    assert out.dtype == ref.dtype
    assert_close_rel(out.float(), ref.float(), torch.bfloat16, "autocast Flux output")
    inputs64 = {k: v.double() for k, v in inputs.items()}
    with torch.no_grad():
        ref, out = model.double()(**inputs64).sample, fused.double()(**inputs64).sample
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_flux_hooks_fire_as_often_as_unfused(generator):
    model = make_flux(generator)
    fused = fuse(copy.deepcopy(model))
    inputs = flux_inputs(generator)
    counts = []
    for m in (model, fused):
        counts.append(count_module_calls(m))
        with torch.no_grad():
            m(**inputs)
    assert counts[1] == counts[0]
    assert counts[0]["single_transformer_blocks.1.act_mlp"] == 1


def test_a_flux_single_block_that_does_not_fit_is_named_by_its_path(generator):
    model = make_flux(generator)
    model.single_transformer_blocks[1].act_mlp = torch.nn.GELU()  # (exact GELU, not tanh)
    with pytest.raises(ValueError, match="block single_transformer_blocks.1 cannot be fused: "
                                         "its MLP is not proj_mlp"):
        fuse(model)
    assert not integration.is_fused(model)
    with pytest.warns(UserWarning, match="1 of 4 blocks left unfused"):
        fuse(model, strict=False)
    assert integration.is_fused(model)
    assert integration.unfuse(model) is model and not integration.is_fused(model)
