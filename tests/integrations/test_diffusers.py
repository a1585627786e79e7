"""onestep in diffusers' DiT: `fuse` keeps outputs and gradients; `DiT.from_diffusers` gives
the same outputs. Models are built from configs with random weights (nothing downloaded)."""

import re

import pytest
import torch
from conftest import assert_close_rel

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")

from onestep_kernels.integrations.diffusers import fuse  # noqa: E402
from onestep_models.diffusers_dit import dit_state_dict  # noqa: E402
from onestep_models.dit import DiT  # noqa: E402


def make_model(generator, num_layers=2, shared_embedder=True, **kwargs):
    args = dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8,
                num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    args.update(kwargs)
    model = diffusers.DiTTransformer2DModel(**args).eval()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero's zeros would hide every block
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        if shared_embedder:  # as in a model converted from an official DiT checkpoint
            first = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)
    return model


def inputs(generator, batch=3):
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.tensor([1.0, 500.0, 999.0])[:batch]
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x, t, y


def test_fuse_keeps_outputs_and_gradients(generator):
    model = make_model(generator, shared_embedder=False)
    x, t, y = inputs(generator)
    ref = model(x, timestep=t, class_labels=y).sample
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    assert fuse(model) is model
    out = model(x, timestep=t, class_labels=y).sample
    out.square().sum().backward()
    assert_close_rel(out, ref, torch.float32, "fused output")
    for name, p in model.named_parameters():
        if name.endswith("to_k.bias"):  # exactly 0 in theory (softmax ignores a shared shift):
            assert p.grad.abs().max() < 1e-5  # both sides are rounding noise
            continue
        assert_close_rel(p.grad, ref_grads[name], torch.float32, f"d{name}")


def test_fuse_refuses_what_it_cannot_run_and_changes_nothing(generator):
    model = make_model(generator)
    model.transformer_blocks[1].ff.net[1].p = 0.1
    with pytest.raises(ValueError, match="block 1 .*dropout"):
        fuse(model)
    assert "forward" not in vars(model.transformer_blocks[0])  # block 0 untouched too
    with pytest.raises(ValueError, match="model:"):
        fuse(torch.nn.Linear(2, 2))


def _mutate(block, change):
    """One thing that fuse cannot run, made in a diffusers block."""
    if change == "norm_type":
        block.norm_type = "layer_norm"
    elif change == "cross_attention":
        block.attn2 = torch.nn.Identity()
    elif change == "pos_embed":
        block.pos_embed = torch.nn.Identity()
    elif change == "embedder":
        block.norm1.emb = None
    elif change == "affine_norm":
        block.norm3 = torch.nn.LayerNorm(block.norm3.normalized_shape)
    elif change == "gelu":
        block.ff.net[0].approximate = "none"


@pytest.mark.parametrize("change, reason", [
    ("norm_type", "norm_type 'layer_norm'"), ("cross_attention", "cross-attention"),
    ("pos_embed", "positional embedding"), ("embedder", "no timestep/label embedder"),
    ("affine_norm", "MLP norm (norm3) is missing or affine"), ("gelu", "not Linear -> GELU(tanh)")])
def test_fuse_names_each_reason_a_block_cannot_run(change, reason, generator):
    model = make_model(generator)
    _mutate(model.transformer_blocks[0], change)
    with pytest.raises(ValueError, match=f"model: block 0 cannot be fused: .*{re.escape(reason)}"):
        fuse(model)
    assert "forward" not in vars(model.transformer_blocks[1])


def test_from_diffusers_refuses_other_output_channels(generator):
    model = make_model(generator)
    model.register_to_config(out_channels=5)
    with pytest.raises(ValueError, match="out_channels 5 is neither"):
        DiT.from_diffusers(model)


@pytest.mark.parametrize("fused", [True, False])
def test_from_diffusers_gives_the_same_outputs(fused, generator):
    model = make_model(generator)
    x, t, y = inputs(generator)
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=y).sample
        dit = DiT.from_diffusers(model, fused=fused).eval()
        out = dit(x, t, y)
    assert dit.learn_sigma and len(dit.blocks) == 2 and dit.num_heads == 2
    assert_close_rel(out, ref.double(), torch.float32, "converted DiT")


def test_from_diffusers_refuses_per_block_embedders(generator):
    model = make_model(generator, shared_embedder=False)
    with pytest.raises(ValueError, match="block 1's timestep/label embedder differs"):
        dit_state_dict(model)


def test_fuse_keeps_adapters_on_the_feed_forward(generator):
    """fc1 (ff.net[0].proj) and fc2 are called as modules: a hook on them, as a LoRA adapter
    installs, changes the fused model's output as it changes diffusers' own."""
    model = make_model(generator)
    x, t, y = inputs(generator)

    def adapter(module, args, output):
        return output * 1.5 + 0.05

    for block in model.transformer_blocks:
        block.ff.net[0].proj.register_forward_hook(adapter)
        block.ff.net[2].register_forward_hook(adapter)
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=y).sample
        out = fuse(model)(x, timestep=t, class_labels=y).sample
    assert_close_rel(out, ref.double(), torch.float32, "fused output with adapters")
