"""The `onestep` command with tiny settings: train, resume, sample, eval, the demo; the user's
errors in one line with exit code 2, the machine's with exit code 1, a bug with its
traceback."""

import errno
import json

import pytest
import torch

from onestep_models import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_sample_eval(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "direct", "--out", str(out), "--steps", "2",
                       "--batch-size", "8", "--no-progress", "--checkpoint-every", "1")
    assert code == 0, err
    assert (out / "checkpoints" / "step_00000002" / "ema.safetensors").is_file()
    assert (out / "grid_direct_1step.png").is_file()
    # the same command again resumes at step 2 and has nothing to do; more steps continue
    code, _, err = run(capsys, "train", "direct", "--out", str(out), "--steps", "3",
                       "--batch-size", "8", "--no-progress", "--checkpoint-every", "1")
    assert code == 0, err
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 3
    code, stdout, err = run(capsys, "sample", "--ckpt", str(out), "--out",
                            str(tmp_path / "s.png"), "--num", "9",
                            "--sampler", "flow_euler_1step")
    assert code == 0 and (tmp_path / "s.png").is_file(), err
    code, stdout, err = run(capsys, "sample", "--ckpt", str(out), "--out",
                            str(tmp_path / "eager.png"), "--num", "9", "--no-cuda-graph")
    assert code == 0 and (tmp_path / "eager.png").is_file(), err
    code, stdout, err = run(capsys, "eval", "--ckpt", str(out), "--num", "20")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["samplers"]["direct_1step"]
    assert entry["digits_fd"] > 0 and 0 <= entry["class_accuracy"] <= 1
    assert "direct_1step" in stdout


def test_grids_along_the_way_and_checkpoints_kept(tmp_path, capsys):
    """--sample-every writes step-tagged grids during training, --grid-size sets their size
    (digits: 8-pixel images, shown at 32 with a 1-pixel frame), --keep-checkpoints how many
    checkpoints stay."""
    from PIL import Image

    code, _, err = run(capsys, "train", "direct", "--out", str(tmp_path), "--steps", "3",
                       "--batch-size", "8", "--no-progress", "--checkpoint-every", "1",
                       "--keep-checkpoints", "1", "--sample-every", "2", "--grid-size", "3")
    assert code == 0, err
    tagged = sorted(p.name for p in tmp_path.glob("grid_direct_1step_step*.png"))
    assert tagged == ["grid_direct_1step_step00000002.png"]
    for name in tagged + ["grid_direct_1step.png"]:  # 3 x 3 digits of 32 + 2 pixels
        assert Image.open(tmp_path / name).size == (102, 102)
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


@pytest.mark.slow
def test_demo_tiny(tmp_path, capsys):
    code, stdout, err = run(capsys, "demo", "--out", str(tmp_path), "--steps", "2",
                            "--eval-samples", "20", "--no-progress")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    bar = metrics["quality_bar"]
    assert set(bar) >= {"fd_ratio_ok", "accuracy_ratio_ok"}
    assert "bar: <= 0.333" in stdout
    # two steps do not pass the bar: the demo says FAIL and exits non-zero
    failed = not (bar["fd_ratio_ok"] and bar["accuracy_ratio_ok"])
    assert ("FAIL:" in stdout) == failed and code == (1 if failed else 0), err
    for name in ("direct_1step", "flow_euler_1step", "flow_euler_128step"):
        assert (tmp_path / f"grid_{name}.png").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["train", "nope", "--out", "x"], "recipe"),
    (["train", "direct"], "--out"),
    (["train", "direct", "--out", "x", "--steps", "0"], "--steps"),
    (["train", "direct", "--out", "x", "--data", "/no/such/dir"], "--data"),
    (["sample", "--ckpt", "/no/such/run", "--out", "x.png"], "--ckpt"),
    (["eval", "--ckpt", "/no/such/run"], "--ckpt"),
    (["train", "direct", "--out", "x", "--device", "tpu"], "--device"),
    (["train", "direct", "--out", "x", "--class-dropout", "2"], "--class-dropout"),
    (["train", "direct", "--out", "x", "--warmup-steps", "-5"], "--warmup-steps"),
    (["train", "direct", "--out", "x", "--grad-clip", "-1"], "--grad-clip"),
    (["train", "direct", "--out", "x", "--lr", "inf"], "--lr"),
    (["train", "direct", "--out", "x", "--ema", "1"], "--ema"),
    (["train", "direct", "--out", "x", "--vae", "/nonexistent"], "--vae"),
    (["train", "direct", "--out", "x", "--skip-nonfinite", "-1"], "--skip-nonfinite"),
    (["sample", "--ckpt", "/no/such/run", "--out", "run/x"], "--out"),
    (["train", "direct", "--out", "x", "--size", "9"], "side 9 do not split into model tiny's"),
])
def test_bad_arguments_one_line_exit_2(argv, needle, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("onestep: error:") and needle in err


# ---- the one error hierarchy: the user's errors exit 2, the machine's 1, a bug shows itself ----


def _sample_raising(monkeypatch, tmp_path, capsys, error):
    """`onestep sample` whose loading of the run raises `error` (from deep inside)."""
    def load_run(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli.sample, "load_run", load_run)
    return run(capsys, "sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "s.png"))


@pytest.mark.parametrize("error", [
    ValueError("boom"),  # a plain ValueError is no longer taken for the user's
    RuntimeError("layernorm_modulate: no backend can run this call: ..."),
    KeyError("step"),
], ids=["ValueError", "no-backend", "KeyError"])
def test_a_bug_shows_its_traceback_and_asks_for_a_report(error, monkeypatch, tmp_path, capsys):
    code, _, err = _sample_raising(monkeypatch, tmp_path, capsys, error)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "load_run" in err
    assert "bug in onestep" in err and "report it" in err


def test_the_users_errors_are_one_line_exit_2(monkeypatch, tmp_path, capsys):
    from onestep_kernels.errors import ArgumentError, DataError

    for error in (ArgumentError("model: unknown size 'huge'"),
                  DataError("runs/x/pairs/x1.npy: truncated"), FileNotFoundError("no such file")):
        code, _, err = _sample_raising(monkeypatch, tmp_path, capsys, error)
        assert code == 2 and err.count("\n") == 1 and err.startswith("onestep: error:"), err
        assert "Traceback" not in err


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   MemoryError("cannot allocate"),
                                   torch.OutOfMemoryError("CUDA out of memory")],
                         ids=["disk-full", "no-memory", "cuda-oom"])
def test_the_machines_errors_are_one_line_exit_1(error, monkeypatch, tmp_path, capsys):
    code, _, err = _sample_raising(monkeypatch, tmp_path, capsys, error)
    assert code == 1 and err.count("\n") == 1 and err.startswith("onestep: error:"), err
    assert "Traceback" not in err


def test_eval_without_checkpoint(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--ckpt", str(tmp_path))
    assert code == 2 and "no checkpoint" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "direct", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.999)" in text and "(default: 5e-05)" in text


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, _, err = run(capsys, "train", "direct", "--out", str(a_file), "--steps", "1")
    assert code == 2 and "--out" in err and "not a directory" in err
    assert not (tmp_path / "checkpoints").exists()
    code, _, err = run(capsys, "sample", "--ckpt", str(tmp_path), "--out",
                       str(tmp_path / "missing_dir" / "s.png"))
    assert code == 2 and "no such directory" in err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "direct", "--out", str(out), "--steps", "2", "--batch-size", "8",
                     "--checkpoint-every", "1", "--log-every", "1"]) == 0
    return out


def test_logs_are_plain_lines_with_a_closing_line(tmp_path, capsys):
    code, stdout, err = run(capsys, "train", "direct", "--out", str(tmp_path), "--steps", "2",
                            "--batch-size", "8", "--log-every", "1")
    assert code == 0, err
    assert "step 1/2  loss" in stdout and "step 2/2  loss" in stdout and "\r" not in err
    assert "trained 2 steps (0 -> 2)" in stdout and "images/s" in stdout
    grid = tmp_path / "grid_direct_1step.png"
    before = grid.stat().st_mtime_ns
    code, stdout, _ = run(capsys, "train", "direct", "--out", str(tmp_path), "--steps", "2",
                          "--batch-size", "8", "--log-every", "1")
    assert code == 0 and "nothing to train" in stdout
    assert grid.stat().st_mtime_ns == before  # a finished run's grids are left alone


def test_ckpt_may_name_the_run_its_checkpoints_or_one(trained_run, tmp_path, capsys):
    for ckpt in (trained_run, trained_run / "checkpoints",
                 trained_run / "checkpoints" / "step_00000001"):
        code, _, err = run(capsys, "sample", "--ckpt", str(ckpt), "--out",
                           str(tmp_path / "s.png"), "--num", "4")
        assert code == 0, (ckpt, err)
    code, _, err = run(capsys, "eval", "--ckpt", str(trained_run / "checkpoints" /
                                                     "step_00000001"), "--num", "10")
    assert code == 0, err
    assert (trained_run / "metrics.json").is_file()  # in the run, not the checkpoint
    assert not (trained_run / "checkpoints" / "step_00000001" / "metrics.json").exists()


def test_one_run_config_from_the_command_line_to_the_checkpoint(trained_run):
    from onestep_models import recipes, train

    saved = train.read_checkpoint_state(train.latest_checkpoint(trained_run))["config"]
    assert set(saved) == {"recipe", "data", "model", "options", "train"}
    args = cli.build_parser().parse_args(["train", "direct", "--out", str(trained_run)])
    made, _, _ = cli.train.run_config(args, "direct")
    assert {k: v for k, v in saved.items() if k != "train"} == made
    recipes.build(saved)  # and back


def test_model_sizes_are_declared_once():
    from onestep_models import recipes
    from onestep_models.dit import DiT_models

    for name in ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"):
        size = recipes.MODEL_SIZES[name]
        with torch.device("meta"):
            dit = DiT_models[name]()
        assert (len(dit.blocks), dit.blocks[0].hidden_size, dit.blocks[0].attn.num_heads,
                dit.patch_size) == (size["depth"], size["hidden_size"], size["num_heads"],
                                    size["patch_size"])


def test_slimflow_stages_from_a_teacher(trained_run, tmp_path, capsys):
    from onestep_models import train

    out = tmp_path / "sf"
    code, stdout, err = run(capsys, "train", "slimflow", "--teacher", str(trained_run), "--out",
                            str(out), "--num-pairs", "40", "--heun-steps", "2", "--steps", "4",
                            "--distill-steps", "2", "--anneal-steps", "2", "--batch-size", "8",
                            "--checkpoint-every", "2", "--log-every", "2")
    assert code == 0, err
    assert "40 pairs" in stdout and stdout.count("trained") == 2
    for stage in ("reflow", "distill"):
        state = train.read_checkpoint_state(train.latest_checkpoint(out / stage))
        assert state["config"]["recipe"] == f"slimflow_{stage}"
    code, stdout, err = run(capsys, "eval", "--ckpt", str(out / "distill"), "--num", "10")
    assert code == 0 and "slimflow_1step" in stdout, err  # against the teacher's digits
    code, stdout, err = run(capsys, "pairs", "--teacher", str(trained_run), "--out",
                            str(out / "pairs"), "--num", "40", "--heun-steps", "2")
    assert code == 0, err  # the same settings: the finished shards stand
    assert "(nothing drawn" not in stdout and "all finished before: nothing drawn" in stdout
    code, _, err = run(capsys, "pairs", "--teacher", str(trained_run), "--out",
                       str(out / "pairs"), "--num", "50", "--heun-steps", "2")
    assert code == 2 and "other settings" in err
    # the SlimFlow run's top folder is a teacher (its last stage; on the parent commit: "no
    # checkpoint under" it, though the help says SlimFlow runs are accepted)
    code, stdout, err = run(capsys, "pairs", "--teacher", str(out), "--out",
                            str(tmp_path / "student_pairs"), "--num", "8", "--heun-steps", "1")
    assert code == 0 and "8 pairs" in stdout, err
    # with --pairs the pairs exist: --num-pairs and --heun-steps cannot apply, and are refused
    # (on the parent commit they were ignored: the same losses with and without them)
    for flag, value in (("--num-pairs", "10"), ("--heun-steps", "7")):
        code, _, err = run(capsys, "train", "slimflow", "--pairs", str(out / "pairs"), "--out",
                           str(tmp_path / "again"), flag, value, "--steps", "1",
                           "--distill-steps", "1", "--batch-size", "8")
        assert code == 2 and err.startswith(f"onestep: error: {flag}: the pairs are --pairs")
        assert err.count("\n") == 1


@pytest.mark.slow
def test_pairs_under_torchrun_share_the_shards(trained_run, tmp_path, capsys):
    """`onestep pairs` in two gloo processes: each draws its shards into the one directory,
    both wait for all, and the result is the pairs of one process, file for file (before,
    each process drew every shard and removed the other's half-written ones)."""
    import os
    import subprocess
    import sys

    from onestep_models import slimflow

    args = ["pairs", "--teacher", str(trained_run), "--num-pairs", "20", "--heun-steps", "2",
            "--shard-size", "6"]
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "one"))
    assert code == 0, err
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--standalone", "-m", "onestep_models.cli", *args, "--out",
                           str(tmp_path / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("20 pairs in") == 1  # (the closing line from rank 0 only)
    (a, _), (b, _) = (slimflow.load_pairs(tmp_path / name) for name in ("one", "two"))
    for ta, tb in zip(a.tensors, b.tensors):
        assert torch.equal(ta, tb)


def test_slimflow_refuses_what_it_cannot_use(tmp_path, capsys):
    code, _, err = run(capsys, "train", "slimflow", "--teacher", str(tmp_path / "none"),
                       "--out", str(tmp_path / "sf"))
    assert code == 2 and "--teacher" in err and err.count("\n") == 1
    code, _, err = run(capsys, "train", "slimflow", "--out", str(tmp_path / "sf"))
    assert code == 2 and "--teacher" in err
    code, _, err = run(capsys, "train", "slimflow", "--teacher", str(tmp_path), "--out",
                       str(tmp_path / "sf"), "--distance", "lpips")
    assert code == 2 and "--vgg" in err


@pytest.mark.slow
def test_train_with_compiled_networks(tmp_path, capsys):
    """--compile: torch.compile of the recipe's networks; the same steps as eager, up to the
    compiler's float reassociation."""
    from safetensors.torch import load_file

    from onestep_models import train

    results = []
    for flag in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flag else "eager")
        code, _, err = run(capsys, "train", "flow", "--out", str(out), "--steps", "2",
                           "--batch-size", "8", *flag)
        assert code == 0, err
        results.append(load_file(train.latest_checkpoint(out) / "model.safetensors"))
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow
def test_demo_slimflow_tiny(tmp_path, capsys):
    """The SlimFlow demo end to end at tiny settings (scaled down with --steps): pairs, both
    stages, evaluation, parameters/MACs and the bars, each printed PASS or FAIL."""
    code, stdout, err = run(capsys, "demo", "--method", "slimflow", "--out", str(tmp_path),
                            "--steps", "3", "--eval-samples", "20", "--no-progress")
    summary = json.loads((tmp_path / "slimflow" / "metrics.json").read_text())
    assert summary["sizes"]["student"]["parameters"] < summary["sizes"]["teacher"]["parameters"]
    assert set(summary["digits_fd"]) == {"student_1step", "reflow_1step", "teacher_euler_1step",
                                         "direct_1step"}
    assert stdout.count("PASS: ") + stdout.count("FAIL: ") == 2 + 4
    assert code == (0 if "FAIL: " not in stdout else 1), err


def test_compiled_networks_leave_the_ema_copy_eager(tmp_path):
    """The EMA copy is made before compiling, so it calls its own weights."""
    from test_train import tiny_data, tiny_run

    from onestep_models import recipes, train

    run = tiny_run("flow")
    trainer = train.Trainer(recipes.build(run), tiny_data(), train.TrainConfig(steps=1),
                            tmp_path, run_config=run, num_classes=3, device="cpu",
                            progress=False, compile=True)
    assert trainer.model.v._compiled_call_impl is not None
    assert getattr(trainer.ema.v, "_compiled_call_impl", None) is None


@pytest.mark.slow
def test_runs_on_vae_latents_of_an_image_folder(tmp_path, capsys, monkeypatch):
    """--data FOLDER --vae: the run trains on the VAE's latents; its grids, `sample` and `eval`
    decode them into images, and so does a SlimFlow student on pairs of its latents. `sample`
    needs only the checkpoint (and the VAE), not the data."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "images"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    teacher = tmp_path / "teacher"
    code, _, err = run(capsys, "train", "direct", "--data", str(data), "--size", "16", "--vae",
                       str(tmp_path / "vae"), "--out", str(teacher), "--steps", "2",
                       "--batch-size", "4", "--no-progress")
    assert code == 0, err
    assert (data / "latents_16.safetensors").is_file()
    with Image.open(teacher / "grid_direct_1step.png") as grid:
        # 10 x 10 decoded 16 x 16 colour images, each shown at 32 px with a 1 px frame
        assert grid.mode == "RGB" and grid.size == (340, 340)
    (data / "latents_16.safetensors").rename(tmp_path / "moved.safetensors")
    (data / "cat").rename(tmp_path / "cat")
    code, _, err = run(capsys, "sample", "--ckpt", str(teacher), "--out",
                       str(tmp_path / "s.png"), "--num", "4")
    assert code == 0, err
    with Image.open(tmp_path / "s.png") as grid:
        assert grid.mode == "RGB" and grid.size == (68, 68)
    (tmp_path / "cat").rename(data / "cat")
    (tmp_path / "moved.safetensors").rename(data / "latents_16.safetensors")
    from onestep_models import metrics
    from onestep_models.inception import FIDInception

    # FID's features come from the decoded images; the distance itself (tested in
    # test_metrics) is a mean gap here: its 2048 x 2048 matrix square roots take minutes on
    # this CPU with 4 samples (a singular covariance: computed twice)
    monkeypatch.setattr(metrics, "frechet_distance",
                        lambda a, b: float(((a.mean(0) - b.mean(0)) ** 2).sum()))
    inception = tmp_path / "pt_inception.pth"  # random weights in pytorch-fid's layout
    torch.save({k: v for k, v in FIDInception().state_dict().items()
                if not k.endswith("num_batches_tracked")}, inception)
    code, stdout, err = run(capsys, "eval", "--ckpt", str(teacher), "--num", "4",
                            "--inception", str(inception))
    assert code == 0 and "direct_1step" in stdout, err
    fid = json.loads((teacher / "metrics.json").read_text())["samplers"]["direct_1step"]["fid"]
    assert fid >= 0  # decoded samples against the decoded real latents

    student = tmp_path / "sf"
    code, _, err = run(capsys, "train", "slimflow", "--teacher", str(teacher), "--out",
                       str(student), "--num-pairs", "8", "--heun-steps", "2", "--steps", "1",
                       "--distill-steps", "1", "--anneal-steps", "1", "--batch-size", "4",
                       "--no-progress")
    assert code == 0, err
    with Image.open(student / "distill" / "grid_slimflow_1step.png") as grid:
        assert grid.mode == "RGB"
    code, _, err = run(capsys, "sample", "--ckpt", str(student / "distill"), "--out",
                       str(tmp_path / "student.png"), "--num", "4")
    assert code == 0, err
    with Image.open(tmp_path / "student.png") as grid:
        assert grid.mode == "RGB" and grid.size == (68, 68)
    code, _, err = run(capsys, "eval", "--ckpt", str(student / "distill"), "--num", "4",
                       "--inception", str(inception))
    assert code == 0, err
    scores = json.loads((student / "distill" / "metrics.json").read_text())
    assert scores["samplers"]["slimflow_1step"]["fid"] >= 0  # against its teacher's images


@pytest.mark.slow
def test_slimflow_with_lpips_keeps_vgg_out_of_its_checkpoints(trained_run, tmp_path, capsys):
    """--distance lpips (random weights in torchvision's and lpips' file layouts: no real ones
    offline): the distillation trains, resumes, and its checkpoints hold the student and its
    guide only, not LPIPS' fixed VGG16 (59 MB); sampling does not need the weight files."""
    from onestep_models.lpips import LPIPS

    torch.manual_seed(0)
    lpips = LPIPS()
    vgg, lins = tmp_path / "vgg16.pth", tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in lpips.features.state_dict().items()}, vgg)
    torch.save({f"lin{i}.model.1.weight": torch.rand_like(lin.weight)
                for i, lin in enumerate(lpips.lins)}, lins)
    out = tmp_path / "sf"
    args = ["train", "slimflow", "--teacher", str(trained_run), "--out", str(out),
            "--num-pairs", "16", "--heun-steps", "2", "--steps", "1", "--anneal-steps", "1",
            "--batch-size", "4", "--no-progress", "--checkpoint-every", "1",
            "--distance", "lpips", "--vgg", str(vgg), "--lpips", str(lins)]
    code, _, err = run(capsys, *args, "--distill-steps", "1")
    assert code == 0, err
    code, stdout, err = run(capsys, *args, "--distill-steps", "2")  # resumes at step 1
    assert code == 0 and "trained 1 steps (1 -> 2)" in stdout, err
    reflow = out / "reflow" / "checkpoints" / "step_00000001" / "model.safetensors"
    distill = out / "distill" / "checkpoints" / "step_00000002" / "model.safetensors"
    # the student and its frozen guide: twice stage 1's single network, give or take
    assert distill.stat().st_size < 3 * reflow.stat().st_size < 5e6
    vgg.unlink()
    lins.unlink()
    code, _, err = run(capsys, "sample", "--ckpt", str(out / "distill"), "--out",
                       str(tmp_path / "s.png"), "--num", "4")
    assert code == 0, err


@pytest.mark.slow
def test_demo_slt_tiny(tmp_path, capsys):
    """The SLT demo end to end at tiny settings (scaled down with --steps): the deep Direct
    Model, the SLT distilled from its one-step map, both evaluated, the per-patch cosine
    similarities, PASS/FAIL lines for its bars."""
    code, stdout, err = run(capsys, "demo", "--method", "slt", "--out", str(tmp_path),
                            "--steps", "2", "--eval-samples", "20", "--no-progress")
    assert code in (0, 1), err  # 2 steps need not pass the bars
    summary = json.loads((tmp_path / "slt" / "metrics.json").read_text())
    assert summary["parameters"]["slt"] * 4 <= summary["parameters"]["teacher"]
    assert len(summary["patch_cosines"]) == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["samplers"]  # the teacher's
    assert "SLT 1-step FD <= 2x the teacher's 1-step FD" in stdout
    assert (tmp_path / "slt" / "grid_slt_1step.png").is_file()
    # then noise screening: its table, bars and plot
    screen = json.loads((tmp_path / "screen" / "metrics.json").read_text())
    assert [row["n"] for row in screen["rows"]] == [1, 8, 32, 128]
    assert all(len(row["per_class_recall"]) == 10 for row in screen["rows"])
    assert "within-class Spearman" in stdout and (tmp_path / "screen" / "screening.png").is_file()
    assert (stdout.count("PASS: ") + stdout.count("FAIL: ")) == 2 + 3 + len(screen["bars"])


@pytest.mark.parametrize("command", ["train direct --out OUT", "sample --ckpt OUT --out x.png",
                                     "eval --ckpt OUT"])
def test_a_seed_no_generator_takes_is_refused_by_name(tmp_path, capsys, command):
    """--seed 2^70: on the parent commit "Overflow when unpacking long long", naming nothing."""
    args = command.replace("OUT", str(tmp_path)).replace("x.png", str(tmp_path / "x.png"))
    code, _, err = run(capsys, *args.split(), "--seed", str(2**70))
    assert code == 2 and err.startswith("onestep: error: argument --seed: expected <= 4294967295")


def test_ctrl_c_outside_training_is_one_line_exit_130(tmp_path):
    """Ctrl-C while `onestep pairs` draws (its KeyboardInterrupt raised inside the drawing): one
    line and exit 130, as the trainer's interrupt (on the parent commit: a KeyboardInterrupt
    traceback). In a process of its own, so that the interrupt cannot reach pytest."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        from onestep_models import cli, slimflow_run

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        slimflow_run.draw_pairs = interrupted
        raise SystemExit(cli.main(["pairs", "--teacher", "unused", "--out",
                                   {str(tmp_path / "pairs")!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 130, done.stderr
    assert done.stderr == ("onestep: interrupted (the finished shards are kept: run the same "
                           "command to draw the rest)\n")


def test_a_second_writer_into_a_pairs_folder_is_refused(trained_run, tmp_path, capsys):
    """While one `onestep pairs` draws into a folder (its lock held), a second is refused in
    one line naming the holder, and leaves nothing behind; the same for a run's folder
    (on the parent commit the second wrote beside the first: `[Errno 39] Directory not
    empty` tracebacks and a temporary left)."""
    import os

    from onestep_models.run_dir import RunLock

    out = tmp_path / "pairs"
    with RunLock(out):
        code, _, err = run(capsys, "pairs", "--teacher", str(trained_run), "--out", str(out),
                           "--num", "8", "--heun-steps", "1")
    assert code == 2 and err.count("\n") == 1, err
    assert f"is being written by another run (pid {os.getpid()})" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    code, stdout, err = run(capsys, "pairs", "--teacher", str(trained_run), "--out", str(out),
                            "--num", "8", "--heun-steps", "1")
    assert code == 0 and "8 pairs" in stdout, err  # once the first is done


def test_sample_and_eval_read_a_running_run_but_write_elsewhere(trained_run, tmp_path, capsys):
    """While a run holds its folder, `eval` (whose metrics.json goes into the run by default)
    and `sample --out RUN/x.png` are refused in one line; written elsewhere, both work (on the
    parent commit both wrote into the running run's folder)."""
    import os

    from onestep_models.run_dir import RunLock

    with RunLock(trained_run):
        code, _, err = run(capsys, "eval", "--ckpt", str(trained_run), "--num", "10")
        assert code == 2 and err.count("\n") == 1
        assert f"is being written by a run (pid {os.getpid()}); write metrics.json elsewhere" \
            in err
        code, _, err = run(capsys, "sample", "--ckpt", str(trained_run), "--out",
                           str(trained_run / "x.png"), "--num", "4")
        assert code == 2 and "write x.png elsewhere" in err
        code, _, err = run(capsys, "eval", "--ckpt", str(trained_run), "--num", "10", "--out",
                           str(tmp_path / "m.json"))
        assert code == 0, err
        code, _, err = run(capsys, "sample", "--ckpt", str(trained_run), "--out",
                           str(tmp_path / "x.png"), "--num", "4")
        assert code == 0, err
    assert not (trained_run / "x.png").exists()
