"""The Single-Layer Transformer (onestep_models.slt): the fused and the reference loop agree and
share a state_dict, the states come from the same pass, the default size is about 4.3M
parameters, all K modulations come from one matrix product, a forward builds no host tensor,
settings and inputs are checked by name."""

import pytest
import torch
from conftest import assert_close_rel

from onestep_models.slt import (
    SLT_SIZES,
    SingleLayerTransformer,
    fusion_depths,
    parameter_count,
    step_sizes,
)


def small(fused=False, **kwargs):
    settings = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, num_heads=2,
                    depth_steps=5, num_classes=10)
    settings.update(kwargs)
    return SingleLayerTransformer(fused=fused, **settings)


def randomised(model, generator):
    """Every weight drawn (adaLN-Zero's zeros would make the block the identity)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def inputs(generator, B=3):
    return (torch.randn(B, 1, 8, 8, generator=generator), torch.rand(B, generator=generator),
            torch.tensor([1, 2, 10])[:B])


@pytest.mark.parametrize("fusion_states", [1, 3], ids=["last_state", "fused_states"])
def test_fused_and_reference_agree_and_share_a_state_dict(fusion_states, generator):
    reference = randomised(small(fusion_states=fusion_states), generator)
    fused = small(fused=True, fusion_states=fusion_states)
    fused.load_state_dict(reference.state_dict(), strict=True)
    x, t, y = inputs(generator)
    outs, grads = [], []
    for model in (reference, fused):
        model.zero_grad()
        out, states = model.forward_with_states(x, t, y, keep=(0, 3))
        (out.square().sum() + sum(s.square().sum() for s in states)).backward()
        outs.append([out, *states])
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for a, b in zip(*outs):
        assert_close_rel(a, b.double(), torch.float32, "outputs")
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        assert_close_rel(grads[1][name], grads[0][name].double(), torch.float32, name)


def test_the_output_is_the_forward_with_states(generator):
    model = randomised(small(), generator)
    x, t, y = inputs(generator)
    out, states = model.forward_with_states(x, t, y, keep=(4,))
    assert torch.equal(out, model(x, t, y)) and states[0].shape == (3, 16, 32)


def test_the_default_size_for_a_dit_xl2_teacher():
    """One block of 384 with its embedders and head: 3.85M parameters; with the distillation's
    384 -> 1152 projection for feature matching, about 4.3M (the paper's count)."""
    model = SingleLayerTransformer()
    count = parameter_count(model)
    assert 2.5e6 <= count <= 7e6 and 4.2e6 <= count + 384 * 1152 + 1152 <= 4.4e6, count
    assert SLT_SIZES["slt-S"] == {"hidden_size": 384, "num_heads": 6, "depth_steps": 28,
                                  "patch_size": 2}


def test_every_modulation_comes_from_one_matrix_product(generator, monkeypatch):
    model = randomised(small(fused=True), generator)
    calls = []
    linear = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        calls.append(tuple(x.shape))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    with torch.no_grad():
        model(*inputs(generator))
    modulation = [s for s in calls if s[-1] == 32 and len(s) == 3 and s[0] == 5]
    assert modulation == [(5, 3, 32)], calls  # (K, B, D): one product for the K applications


def test_the_steps_are_folded_into_the_gates(generator):
    model = randomised(small(depth_steps=4), generator)
    c = torch.randn(3, 32, generator=generator)
    mods = model.modulations(c).view(4, 3, 6, 32)
    tau = model.tau_embedder(model.depth_time * model.time_scale)
    raw = model.block.adaLN_modulation(c[None] + tau[:, None]).view(4, 3, 6, 32)
    assert torch.allclose(mods[:, :, [2, 5]], raw[:, :, [2, 5]] / 4)  # Delta_k = 1/K
    assert torch.equal(mods[:, :, [0, 1, 3, 4]], raw[:, :, [0, 1, 3, 4]])


def test_schedules_and_fusion_depths():
    assert torch.equal(step_sizes(4), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(step_sizes(3, "unit"), torch.ones(3, dtype=torch.float64))
    assert fusion_depths(28, 4) == (6, 13, 20, 27)
    assert fusion_depths(5, 1) == (4,)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        step_sizes(3, "cosine")
    with pytest.raises(ValueError, match=r"fusion_states: expected 1\.\.5"):
        small(fusion_states=6)
    with pytest.raises(ValueError, match="depth_steps: expected an int >= 1"):
        small(depth_steps=0)


@pytest.mark.parametrize("fused", [False, True])
def test_forward_makes_no_host_tensor(fused):
    """On the meta device the forward touches no CPU tensor: the depth times, the steps and
    the gate columns are buffers, so the loop can be captured in a CUDA graph."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    host_ops = []

    class FlagHostTensors(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    host_ops.append(str(func))
            return out

    model = small(fused=fused).to("meta")
    x = torch.empty(2, 1, 8, 8, device="meta")
    with torch.no_grad(), FlagHostTensors():
        out = model(x, torch.empty(2, device="meta"),
                    torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, 1, 8, 8) and host_ops == [], host_ops


def test_inputs_are_checked_by_name(generator):
    model = small()
    x, t, y = inputs(generator, B=2)
    with pytest.raises(ValueError, match=r"x: expected \(B, 1, 8, 8\)"):
        model(torch.randn(2, 1, 9, 9), t, y)
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        model(x, torch.rand(3), y)
    with pytest.raises(ValueError, match="y: expected"):
        model(x, t, None)
    with pytest.raises(ValueError, match=r"y: labels must be in 0\.\.10"):
        model(x, t, torch.tensor([0, 11]))
    unconditional = small(num_classes=0)
    assert unconditional(x, t, None).shape == x.shape
