"""A step's memory known before the step (issue 29, item 5): a batch that cannot fit is refused
before the step with the estimate, and the first step reports its time and peak memory. On the
parent commit `--batch-size 100000000` on digits ran for minutes at gigabytes, deaf to SIGTERM."""

import os
import subprocess
import sys

import pytest
import torch
from test_train import make_trainer

from onestep_models import step_memory, train


@pytest.mark.parametrize("recipe", ["direct", "flow"])
def test_the_probes_extrapolate_to_what_the_step_saves(tmp_path, recipe):
    """The line through the two probes' saved bytes meets the bytes a whole batch saves."""
    trainer = make_trainer(tmp_path, 1, recipe=recipe, batch_size=40)
    params = list(trainer.model.parameters())
    per_sample, per_step = step_memory.activation_bytes(trainer._probe_loss, 40, params)
    measured = step_memory.saved_tensor_bytes(lambda: trainer._probe_loss(40), params)
    assert per_sample > 0
    assert abs(per_sample * 40 + per_step - measured) <= 0.05 * measured


def test_saved_bytes_count_each_storage_once_and_no_parameter():
    weight = torch.nn.Parameter(torch.randn(5, 3))
    x = torch.randn(8, 5, requires_grad=True)

    def run():
        h = x @ weight  # saves x and weight: weight is a parameter, not counted
        return (h * h).sum()  # saves h (once, though as both operands)
    assert step_memory.saved_tensor_bytes(run, [weight]) == (8 * 5 + 8 * 3) * 4


def test_a_step_that_cannot_fit_is_refused_before_it_is_taken(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, 2, batch_size=64)
    monkeypatch.setattr(step_memory, "available_bytes", lambda device: 10_000)
    with pytest.raises(train.StepTooLarge, match=r"^--batch-size: a step of 64 samples needs "
                       r"at least [\d.]+ MB .* more than the 10 KB free on cpu; lower "
                       r"--batch-size$"):
        trainer.fit()
    assert trainer.step == 0 and train.latest_checkpoint(tmp_path) is None


def test_a_huge_batch_is_one_line_before_any_step(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "onestep_models.cli", "train", "direct", "--out",
         str(tmp_path), "--batch-size", "100000000", "--steps", "1", "--no-progress"],
        check=False, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("onestep: error: --batch-size: a step of 100000000 samples "
                                  "needs at least ")
    assert "TB" in proc.stderr and "first step" not in proc.stdout


def test_the_first_step_reports_its_time_and_memory(tmp_path, capsys):
    from onestep_models import cli

    assert cli.main(["train", "direct", "--out", str(tmp_path), "--steps", "2", "--batch-size",
                     "16", "--no-progress", "--grid-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("first step") == 1
    assert "peak memory" in out and "resident (the process), estimated at least" in out
