"""onestep_models.dit.DiT: the reference architecture (names, sizes, parameter count,
initialisation, semantics), fused vs unfused on one state_dict, and that it trains."""

import pytest
import torch
from conftest import assert_close_rel

from onestep_models.dit import DiT, DiT_models, sincos_2d_pos_embed


def small(**kwargs):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                num_classes=10)
    args.update(kwargs)
    return DiT(**args)


def test_dit_xl2_parameter_count():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_model_table_has_the_eight_standard_sizes():
    expected = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    assert len(DiT_models) == 12  # S, B, L, XL x patch 2, 4, 8
    for name, (depth, hidden, heads) in expected.items():
        for p in (2, 4, 8):
            with torch.device("meta"):
                m = DiT_models[f"DiT-{name}/{p}"]()
            assert (len(m.blocks), m.pos_embed.shape[-1], m.num_heads, m.patch_size) == (depth, hidden, heads, p)


def test_state_dict_keys_are_the_official_ones():
    keys = set(small(depth=1).state_dict())
    official = {
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    } | {f"blocks.0.{k}" for k in (
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")}
    assert keys == official
    # the null class for classifier-free guidance is an extra embedding row
    assert small().y_embedder.embedding_table.weight.shape == (11, 64)


def test_pos_embed_is_frozen_2d_sincos():
    model = small()
    assert not model.pos_embed.requires_grad
    emb = sincos_2d_pos_embed(8, 3)  # dim 8: 2 frequencies per axis and function
    # token (row 1, col 2): first half from the column, second half from the row
    col, row = 2.0, 1.0
    omega = torch.tensor([1.0, 1.0 / 100.0])
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                          torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(emb[1 * 3 + 2], expected)


def test_adaln_zero_init_gives_zero_output():
    model = small()
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.tensor([1, 2]))
    assert out.shape == (2, 8, 8, 8) and torch.count_nonzero(out) == 0


def randomise(model, generator):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("num_classes", [10, 0])
def test_fused_and_unfused_agree_on_one_state_dict(num_classes, generator):
    unfused = randomise(small(num_classes=num_classes, learn_sigma=False), generator).eval()
    fused = small(num_classes=num_classes, learn_sigma=False, fused=True).eval()
    fused.load_state_dict(unfused.state_dict(), strict=True)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.rand(3, generator=generator) * 1000
    y = torch.randint(0, 10, (3,), generator=generator) if num_classes else None
    reference = unfused.double()(x.double(), t.double(), y)
    assert_close_rel(fused(x, t, y), reference, torch.float32, "fused DiT")


def test_forward_with_cfg_reference_semantics(generator):
    model = randomise(small(), generator).eval()
    x = torch.randn(2, 4, 8, 8, generator=generator).repeat(2, 1, 1, 1)
    t = torch.full((4,), 500.0)
    y = torch.tensor([3, 7, 10, 10])  # second half: the null class
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    raw = model(x, t, y)
    cond, uncond = raw[:2, :3], raw[2:, :3]
    torch.testing.assert_close(out[:2, :3], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(out[2:, :3], out[:2, :3])
    torch.testing.assert_close(out[:, 3:], raw[:, 3:])  # not guided: official default
    all_channels = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=None)
    torch.testing.assert_close(all_channels[:2], raw[2:] + 4.0 * (raw[:2] - raw[2:]))


def test_a_few_steps_reduce_the_loss(generator):
    torch.manual_seed(0)
    model = small(fused=True, learn_sigma=False)
    x = torch.randn(8, 4, 8, 8, generator=generator)
    t = torch.rand(8, generator=generator) * 1000
    y = torch.randint(0, 10, (8,), generator=generator)
    target = torch.randn(8, 4, 8, 8, generator=generator)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(x, t, y), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(2, 3, 8, 8)), "x:"),
    (dict(t=torch.rand(3)), "t:"),
    (dict(y=None), "y:"),
])
def test_bad_input(bad, match):
    args = dict(x=torch.randn(2, 4, 8, 8), t=torch.rand(2), y=torch.tensor([1, 2]))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        small()(**args)


@pytest.mark.parametrize("fused", [False, True])
def test_forward_makes_no_host_tensor(fused):
    """A forward on the meta device touches no CPU tensor: no host-to-device copy and no
    host-side constant is built per call, which CUDA-graph capture forbids."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from onestep_models import direct, flow
    from onestep_models.dit import FlowDiT

    host_ops = []

    class FlagHostTensors(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    host_ops.append(str(func))
            return out

    model = FlowDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                    num_heads=4, num_classes=10, fused=fused).to("meta")
    x = torch.empty(2, 4, 8, 8, device="meta")
    t = torch.empty(2, device="meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    with torch.no_grad(), FlagHostTensors():
        out = model(x, t, y)
        # and the sampling loops around it, as `onestep sample` runs them
        euler = flow.euler(model, x, 2, y)
        one_step = direct.sample(model, x, y)
    assert out.shape == euler.shape == one_step.shape == (2, 4, 8, 8)
    assert host_ops == [], host_ops


def test_inputs_are_checked_by_name():
    from onestep_kernels.layers import FusedDiTBlock
    from onestep_models.dit import FlowDiT

    model = FlowDiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                    num_heads=2, num_classes=10)
    t = torch.rand(2)
    for side in (9, 10):
        with pytest.raises(ValueError, match="x: expected \\(B, 1, 8, 8\\)"):
            model(torch.randn(2, 1, side, side), t, torch.tensor([1, 2]))
    for bad in ([-1, 2], [1, 11]):
        with pytest.raises(ValueError, match=r"y: labels must be in 0\.\.10"):
            model(torch.randn(2, 1, 8, 8), t, torch.tensor(bad))
    model(torch.randn(2, 1, 8, 8), t, torch.tensor([0, 10]))  # 10: the null class
    no_null_class = FlowDiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                            num_heads=2, num_classes=10, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match=r"y: labels must be in 0\.\.9 \(this model has no null"):
        no_null_class(torch.randn(2, 1, 8, 8), t, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"c: expected \(B, 32\)"):
        FusedDiTBlock(32, 2)(torch.randn(2, 4, 32), torch.randn(2, 1, 32))
