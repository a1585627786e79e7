"""The Single-Layer Transformer (onestep_models.slt): the fused and the reference loop agree and
share a state_dict, the states come from the same pass, the default size is about 4.3M
parameters, all K modulations come from one matrix product, a forward builds no host tensor,
settings and inputs are checked by name."""

import copy

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


def test_a_bfloat16_copy_embeds_the_depth_times_themselves(generator):
    """The depth times' sinusoids are constants computed in fp32 when the model is built: a
    bf16 copy holds them rounded to bf16, as its MLP reads them. (Embedding the bf16 buffer
    of depth times instead turned 1000 * 3/8 = 375 into 376.)"""
    from onestep_models.dit import TimestepEmbedder

    model = randomised(small(depth_steps=8), generator)
    exact = TimestepEmbedder.timestep_embedding(model.depth_time * model.time_scale, 256)
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half.depth_embeddings(), half.tau_embedder.mlp(exact.bfloat16()))
        assert torch.equal(model.depth_embeddings(),
                           model.tau_embedder(model.depth_time * model.time_scale))


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


# ---- the distillation recipe ----------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A Direct Models run on digits, two steps: a one-step teacher of depth 4."""
    from onestep_models import cli

    out = tmp_path_factory.mktemp("teacher")
    assert cli.main(["train", "direct", "--out", str(out), "--steps", "2", "--batch-size", "8",
                     "--no-progress", "--checkpoint-every", "1"]) == 0
    return out


def _distil(teacher_run, out, *extra):
    from onestep_models import cli

    return cli.main(["train", "slt", "--teacher", str(teacher_run), "--out", str(out),
                     "--steps", "2", "--batch-size", "8", "--no-progress",
                     "--checkpoint-every", "1", "--grid-size", "2", *extra])


def test_distillation_trains_checkpoints_and_samples_without_the_teacher(teacher_run, tmp_path,
                                                                         capsys):
    import json

    from onestep_models import cli, recipes, runs
    from onestep_models.run_dir import load_tensors

    assert _distil(teacher_run, tmp_path) == 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"output", "feature", "cos_0", "cos_3"} <= set(log[-1])
    checkpoint = tmp_path / "checkpoints" / "step_00000002"
    state = json.loads((checkpoint / "state.json").read_text())
    options = state["config"]["options"]
    assert options["teacher"]["recipe"] == "direct" and len(options["teacher"]["digest"]) == 64
    assert state["config"]["data"]["kind"] == "noise"  # data-free
    for which in ("model", "ema"):  # the student and the projection; no teacher weight
        names = load_tensors(checkpoint / f"{which}.safetensors")
        assert names and all(k.startswith(("student.", "projection.")) for k in names), names
    model, run, _ = runs.load_run(tmp_path, torch.device("cpu"))  # sampling: no teacher loaded
    assert model._teacher is None and list(model.samplers()) == ["slt_1step"]
    x0, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    ones = torch.ones(3)
    assert torch.equal(model.samplers()["slt_1step"](x0, y), x0 + model.student(x0, ones, y))
    recipe = recipes.build(run)  # training: the teacher, frozen, outside the module tree
    assert recipe._teacher is not None
    assert not any(p is t for p in recipe.parameters()
                   for t in recipe._teacher.net.parameters())
    import copy

    assert copy.deepcopy(recipe)._teacher is recipe._teacher  # the EMA copy shares it


def test_two_seeded_distillations_are_bit_identical(teacher_run, tmp_path):
    from onestep_models.run_dir import load_tensors

    for name in ("a", "b"):
        assert _distil(teacher_run, tmp_path / name) == 0
    a, b = (load_tensors(tmp_path / n / "checkpoints" / "step_00000002" / "model.safetensors")
            for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_that_is_no_one_step_map_or_changed_is_refused(teacher_run, tmp_path, capsys):
    import json

    from onestep_models import cli

    assert cli.main(["train", "flow", "--out", str(tmp_path / "flow"), "--steps", "1",
                     "--batch-size", "8", "--no-progress", "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    assert _distil(tmp_path / "flow", tmp_path / "slt") == 2
    err = capsys.readouterr().err
    assert "'flow' run, not a one-step map" in err and err.count("\n") == 1
    # a run distilled from one teacher does not resume with other weights under its path
    assert _distil(teacher_run, tmp_path / "slt2") == 0
    state_path = tmp_path / "slt2" / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_path.read_text())
    state["config"]["options"]["teacher"]["digest"] = "0" * 64
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    from onestep_models import recipes

    with pytest.raises(ValueError, match="not the ones this run was distilled from"):
        recipes.build(state["config"])


def test_the_data_free_dataset_is_balanced_labels_and_no_memory():
    from onestep_models.recipes import noise_labels

    data = noise_labels({"shape": [1, 8, 8], "num_classes": 10, "size": 25})
    samples, labels = data.tensors
    assert samples.shape == (25, 1, 8, 8) and samples.stride(0) == 0
    assert labels.tolist() == [i % 10 for i in range(25)]


def test_feature_matching_reads_the_teacher_through_hooks(teacher_run):
    """The matched teacher states are its blocks' outputs after layers L/P..L, captured by
    forward hooks on the unchanged teacher; pooled where the SLT's patch is coarser."""
    from onestep_models import recipes
    from onestep_models.slt import _pool_tokens, teacher_depths

    assert teacher_depths(28, 4) == (6, 13, 20, 27) and teacher_depths(4, 4) == (0, 1, 2, 3)
    run, _, _ = recipes.slt_run_config(teacher_run, "slt-tiny", True,
                                       recipes.default_options("slt"), data_size=16)
    recipe = recipes.build(run)
    teacher = recipe._teacher.net
    x0, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 10])
    expected = []

    def keep(module, args, out):
        expected.append(out)

    handles = [b.register_forward_hook(keep) for b in teacher.blocks]
    out, states = recipe.teacher_outputs(x0, y)
    for handle in handles:
        handle.remove()
    assert torch.equal(out, teacher(x0, torch.ones(2), y))
    assert all(torch.equal(s, expected[k]) for s, k in zip(states, recipe.teacher_depths))
    pooled = _pool_tokens(torch.arange(32.0).reshape(1, 16, 2), 2)  # a 4 x 4 grid to 2 x 2
    assert pooled.shape == (1, 4, 2) and pooled[0, 0, 0] == (0 + 2 + 8 + 10) / 4


def test_the_ablations_are_settings(teacher_run, tmp_path):
    """No fusion (the head reads the last state; the four patches still matched), output
    alone (--feature-weight 0) and fewer depth steps than the teacher's layers."""
    import json

    assert _distil(teacher_run, tmp_path / "a", "--no-fusion", "--feature-weight", "0",
                   "--depth-steps", "2", "--patches", "2") == 0
    config = json.loads((tmp_path / "a" / "checkpoints" / "step_00000002" /
                         "state.json").read_text())["config"]
    assert config["model"]["fusion_states"] == 1 and config["model"]["depth_steps"] == 2
    assert config["options"]["patches"] == 2 and config["options"]["feature_weight"] == 0
    last = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[-1])
    assert "cos_1" in last and "cos_2" not in last


@pytest.mark.slow
def test_two_gloo_processes_match_one(teacher_run, tmp_path):
    """`onestep train slt` under torchrun (2 gloo processes): both ranks load the teacher
    (outside DDP: nothing of it is broadcast or averaged), and the run equals one process with
    the same global batch up to float summation order."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from onestep_models import train

    args = ["train", "slt", "--teacher", str(teacher_run), "--steps", "2", "--batch-size", "8",
            "--no-progress", "--checkpoint-every", "2", "--grid-size", "2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--standalone", "-m", "onestep_models.cli", *args, "--out",
                           str(tmp_path / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _distil(teacher_run, tmp_path / "one", "--checkpoint-every", "2") == 0
    one, two = (load_file(train.latest_checkpoint(tmp_path / n) / "model.safetensors")
                for n in ("one", "two"))
    assert one.keys() == two.keys()
    for k, v in one.items():
        difference = ((two[k].double() - v.double()).norm() / v.double().norm()).item()
        assert difference <= 2e-6, (k, difference)


@pytest.mark.slow
def test_compiled_distillation_takes_the_eager_steps(teacher_run, tmp_path):
    """--compile on the SLT recipe (the student and the projection compiled; the teacher read
    through hooks stays eager): the same two steps as eager, up to float reassociation."""
    from safetensors.torch import load_file

    from onestep_models import train

    results = []
    for name, flag in (("eager", []), ("compiled", ["--compile"])):
        assert _distil(teacher_run, tmp_path / name, *flag) == 0
        results.append(load_file(train.latest_checkpoint(tmp_path / name) /
                                 "model.safetensors"))
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_distillation_trains_on_the_gpu_under_bf16_autocast(teacher_run, tmp_path):
    """The trainer's default on a GPU (bf16 autocast, the fused depth loop, the teacher read
    through hooks in bf16): two steps, finite losses and cosines, the student's weights move
    and are finite on disk."""
    import json

    from safetensors.torch import load_file

    from onestep_models import train

    assert _distil(teacher_run, tmp_path / "a", "--steps", "1", "--device", "cuda") == 0
    assert _distil(teacher_run, tmp_path / "b", "--device", "cuda") == 0
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(v)).all() for entry in log for k, v in entry.items()
               if k in ("loss", "output", "feature") or k.startswith("cos_")), log
    one, two = (load_file(train.latest_checkpoint(tmp_path / n) / "model.safetensors")
                for n in ("a", "b"))
    assert all(torch.isfinite(v).all() for v in two.values())
    assert any(not torch.equal(one[k], two[k]) for k in one if k.startswith("student."))
