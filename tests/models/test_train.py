"""The trainer: exact resume, crash-safe checkpoints, the sampler and random streams that make
runs reproducible, grids, and two gloo processes against one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from onestep_models import recipes, train

TINY_MODEL = dict(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                  num_heads=2, num_classes=3, class_dropout_prob=0.1, fused=True)


def tiny_run(recipe="direct"):
    return {"recipe": recipe, "data": {"kind": "test"}, "model": dict(TINY_MODEL),
            "options": recipes.default_options(recipe)}


def tiny_data(n=40):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=g).clamp(-1, 1),
                         torch.randint(3, (n,), generator=g))


def make_trainer(out, steps, recipe="direct", checkpoint_every=3, batch_size=8, device="cpu"):
    torch.manual_seed(123)  # the same initial weights for every trainer in a test
    run = tiny_run(recipe)
    config = train.TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, log_every=1,
                               checkpoint_every=checkpoint_every, grid_size=2, warmup_steps=2,
                               grad_clip=1.0)
    return train.Trainer(recipes.build(run), tiny_data(), config, out, run_config=run,
                         num_classes=3, device=device, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_dit_trains_on_the_gpu_under_bf16_autocast(tmp_path):
    """The trainer's default on a GPU: bf16 autocast around the fused DiT's loss. Two steps
    run, the loss is finite, the weights move and the checkpoint holds finite weights."""
    trainer = make_trainer(tmp_path, 2, checkpoint_every=2, device="cuda")
    assert trainer.config.amp
    before = weights(trainer.model)
    trainer.fit()
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    after = weights(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saved = load_file(train.latest_checkpoint(tmp_path) / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_ema_follows_the_weights_with_its_warm_up(tmp_path):
    """After each step the EMA moves towards the new weights by 1 - decay, decay = min(
    ema_decay, (1 + step) / (10 + step)) (the warm-up), every parameter of the recipe."""
    trainer = make_trainer(tmp_path, 3)
    expected = [e.detach().clone() for e in trainer.ema.parameters()]
    for step in range(3):
        trainer.train_step()
        decay = min(trainer.config.ema_decay, (1 + step) / (10 + step))
        expected = [e.lerp(p.detach(), 1 - decay)
                    for e, p in zip(expected, trainer.model.parameters())]
        assert trainer.step == step + 1
        for got, want in zip(trainer.ema.parameters(), expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(e, p) for e, p in zip(trainer.ema.parameters(),
                                                     trainer.model.parameters()))


def test_ema_follows_trained_parameters_and_persistent_buffers_only(tmp_path):
    """Frozen parameters and non-persistent buffers (a SlimFlow guide, LPIPS' VGG) are not
    followed: the EMA's copies stay as they were made, even when the model's change; the
    trained parameters are averaged and the persistent buffers copied."""
    trainer = make_trainer(tmp_path, 3)
    model, ema = trainer.model, trainer.ema
    model.register_buffer("statistic", torch.zeros(3))
    model.register_buffer("constant", torch.zeros(3), persistent=False)
    model.v.requires_grad_(False)
    ema.register_buffer("statistic", torch.zeros(3))
    ema.register_buffer("constant", torch.zeros(3), persistent=False)
    trainer._ema_params, trainer._ema_buffers = train._ema_pairs(model, ema)
    frozen = weights(ema.v)
    with torch.no_grad():
        for p in model.v.parameters():
            p.add_(1.0)
    model.statistic.fill_(2.0)
    model.constant.fill_(3.0)
    trained = {k: v.clone() for k, v in ema.w.state_dict().items()}
    for _ in range(3):  # (the warm-up's first step has learning rate 0)
        trainer.train_step()
    assert all(torch.equal(frozen[k], v) for k, v in ema.v.state_dict().items())
    assert torch.equal(ema.statistic, torch.full((3,), 2.0))
    assert torch.equal(ema.constant, torch.zeros(3))
    assert any(not torch.equal(trained[k], v) for k, v in ema.w.state_dict().items())


@pytest.mark.parametrize("recipe", ["direct", "flow"])
def test_resume_matches_an_uninterrupted_run(tmp_path, recipe):
    full = make_trainer(tmp_path / "full", 6, recipe)
    full.fit()
    # "crash" after step 3 (the checkpoint), then a new process-like trainer resumes
    part = make_trainer(tmp_path / "part", 3, recipe)
    part.fit()
    resumed = make_trainer(tmp_path / "part", 6, recipe)
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    for name in ("model", "ema"):
        a, b = weights(getattr(full, name)), weights(getattr(resumed, name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    assert (tmp_path / "full" / f"grid_{next(iter(full.ema.samplers()))}.png").is_file()
    lines = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_are_complete_or_absent(tmp_path):
    trainer = make_trainer(tmp_path, 4, checkpoint_every=2)
    trainer.fit()
    root = tmp_path / train.CHECKPOINT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]
    latest = train.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000004"
    state = train.read_checkpoint_state(latest)
    assert state["step"] == 4 and state["config"]["train"]["steps"] == 4
    assert set(load_file(latest / "model.safetensors")) == set(trainer.model.state_dict())
    # a half-written checkpoint (no state.json, a temporary name) is never picked
    (root / ".tmp_step_00000006_1").mkdir()
    (root / "step_00000008").mkdir()
    assert train.latest_checkpoint(tmp_path).name == "step_00000004"


def test_resume_refuses_another_configuration(tmp_path):
    make_trainer(tmp_path, 2, "direct", checkpoint_every=2).fit()
    other = make_trainer(tmp_path, 4, "flow")
    with pytest.raises(train.ConfigChanged, match="recipe: 'direct' -> 'flow'"):
        other.resume()


def test_epoch_sampler_visits_every_item_once_per_epoch():
    sampler = train.EpochSampler(10, 4, seed=3)
    seen = torch.cat([sampler.indices(s) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])
    assert torch.equal(train.EpochSampler(10, 4, seed=3).indices(3), sampler.indices(3))


def test_batch_random_rows_do_not_depend_on_the_split():
    whole = train.BatchRandom(7, 6)
    a, b = train.BatchRandom(7, 6, slice(0, 3)), train.BatchRandom(7, 6, slice(3, 6))
    n, u = whole.normal(2), whole.uniform()
    torch.testing.assert_close(torch.cat([a.normal(2), b.normal(2)]), n, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([a.uniform(), b.uniform()]), u, rtol=0, atol=0)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        train.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        train.TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="ema_decay"):
        train.TrainConfig(ema_decay=1.0)


def test_save_grid(tmp_path):
    from PIL import Image

    images = torch.rand(5, 1, 8, 8) * 2 - 1
    train.save_grid(images, tmp_path / "g.png", nrow=3)
    with Image.open(tmp_path / "g.png") as img:
        assert img.size == (3 * 34, 2 * 34) and img.mode == "L"  # 8 px x4 = 32, +2 border
    with pytest.raises(ValueError, match="images"):
        train.save_grid(torch.zeros(2, 2, 8, 8), tmp_path / "bad.png", nrow=2)


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from models.test_train import make_trainer, tiny_data, tiny_run
from onestep_models import recipes, train
rank = int(os.environ["RANK"])
trainer = make_trainer({out!r}, 3, checkpoint_every=3)
trainer.fit()
torch.save(trainer.model.state_dict(), {out!r} + f"/rank{{rank}}.pt")
# a fresh run whose processes build different networks (each its own seed): DDP makes them
# rank 0's before the first step
torch.manual_seed(1000 + rank)
run = tiny_run()
config = train.TrainConfig(steps=2, batch_size=8, lr=1e-3, checkpoint_every=2, grid_size=2)
other = train.Trainer(recipes.build(run), tiny_data(), config, {fresh!r}, run_config=run,
                      num_classes=3, device="cpu", progress=False)
other.fit()
torch.save(other.model.state_dict(), {fresh!r} + f"/rank{{rank}}.pt")
"""


def relative_difference(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.slow
def test_under_torchrun_each_process_takes_its_own_gpu(monkeypatch):
    """torchrun's LOCAL_RANK picks the GPU of a process asked for "cuda" (every process took
    GPU 0 before, which nccl refuses), made current before nccl joins; an explicit index is
    kept; outside torchrun nothing is joined. (The CUDA and nccl calls are recorded, not made.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(train.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train.dist, "init_process_group",
                        lambda backend: calls.append(("init", backend)))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert train.init_distributed(torch.device("cuda")) == torch.device("cuda")
    assert calls == []
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert train.init_distributed(torch.device("cuda")) == torch.device("cuda", 3)
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", "nccl")]
    calls.clear()
    assert train.init_distributed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    calls.clear()
    assert train.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert calls == [("init", "gloo")]


def test_two_gloo_processes_match_one(tmp_path):
    """Under torchrun (2 gloo processes): every rank holds bit-identical weights after the
    steps, also when the processes built different networks; and they equal one process
    with the same global batch up to float summation order."""
    tests = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "run.py"
    out, fresh = tmp_path / "ddp", tmp_path / "fresh"
    script.write_text(DDP_SCRIPT.format(tests=tests, out=str(out), fresh=str(fresh)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--standalone", str(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for directory in (out, fresh):
        rank0, rank1 = (torch.load(directory / f"rank{r}.pt") for r in (0, 1))
        for k in rank0:
            assert torch.equal(rank0[k], rank1[k]), f"{directory.name}: {k} differs by rank"
    single = make_trainer(tmp_path / "single", 3, checkpoint_every=3)
    single.fit()
    ddp = load_file(train.latest_checkpoint(out) / "model.safetensors")
    for k, v in single.model.state_dict().items():
        assert relative_difference(ddp[k], v) <= 1e-6, (k, relative_difference(ddp[k], v))


def test_a_seed_fixes_a_fresh_run(tmp_path, capsys):
    """Two fresh runs with the same arguments are bit-identical, initialisation included."""
    from onestep_models import cli

    runs = []
    for name in ("a", "b"):
        args = ["train", "direct", "--out", str(tmp_path / name), "--steps", "1",
                "--batch-size", "2", "--seed", "0", "--no-progress", "--model", "tiny"]
        assert cli.main(args) == 0, capsys.readouterr().err
        runs.append(load_file(train.latest_checkpoint(tmp_path / name) / "model.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
