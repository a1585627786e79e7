"""The `onestep` command with tiny settings: train, resume, sample, eval, the demo, and one-line
errors with exit code 2."""

import json

import pytest

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


@pytest.mark.slow
def test_demo_tiny(tmp_path, capsys):
    code, stdout, err = run(capsys, "demo", "--out", str(tmp_path), "--steps", "2",
                            "--eval-samples", "20", "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["quality_bar"]) >= {"fd_ratio_ok", "accuracy_ratio_ok"}
    assert "bar: <= 0.333" in stdout
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
])
def test_bad_arguments_one_line_exit_2(argv, needle, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("onestep: error:") and needle in err


def test_eval_without_checkpoint(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--ckpt", str(tmp_path))
    assert code == 2 and "no checkpoint" in err
