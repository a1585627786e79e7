"""Metrics: the Fréchet distance against closed forms, the shipped digits classifier, class
accuracy, straightness, and the FID Inception's layout and loading path (random weights)."""

import numpy as np
import pytest
import torch

from onestep_models import metrics
from onestep_models.data import digits
from onestep_models.inception import FIDInception


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    # N(0, I) vs N(mu, diag(s^2)): |mu|^2 + sum (1 - s)^2
    mu, s = np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.5, 1.0])
    b = rng.standard_normal((20000, 3)) * s + mu
    expected = (mu ** 2).sum() + ((1 - s) ** 2).sum()
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="feat_b"):
        metrics.frechet_distance(a, b[:1])


def test_shipped_classifier_is_accurate_on_held_out_digits():
    images, labels = digits().tensors
    model = metrics.load_classifier()
    held_out = slice(-297, None)  # the images train_classifier() holds out
    accuracy = metrics.class_accuracy(images[held_out], labels[held_out], model)
    assert accuracy >= 0.95
    # digits-FD: real vs real (interleaved halves) is small, real vs noise is large
    assert metrics.digits_fd(images[::2], images[1::2], model) < 3
    assert metrics.digits_fd(torch.rand(500, 1, 8, 8) * 2 - 1, images, model) > 100
    with pytest.raises(FileNotFoundError, match="classifier"):
        metrics.load_classifier("/no/such/file.safetensors")


@pytest.mark.slow
def test_classifier_training_writes_weights_that_load(tmp_path, capsys):
    """`python -m onestep_models.metrics`, which made the shipped weights, at 60 steps: the
    weights it writes load and score the held-out accuracy it printed, well above chance."""
    from safetensors import safe_open

    path = tmp_path / "classifier.safetensors"
    threads = torch.get_num_threads()
    try:
        metrics.main(["--out", str(path), "--steps", "60", "--seed", "1"])
    finally:
        torch.set_num_threads(threads)  # main runs on one thread, for a fixed arithmetic order
    printed = float(capsys.readouterr().out.split("accuracy ")[1].split(";")[0])
    images, labels = digits().tensors
    accuracy = metrics.class_accuracy(images[-297:], labels[-297:], metrics.load_classifier(path))
    assert accuracy == pytest.approx(printed, abs=1e-4) and accuracy > 0.25  # chance: 0.1
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"heldout_accuracy": f"{printed:.4f}", "steps": "60",
                                "seed": "1"}


def test_straightness():
    x0 = torch.randn(4, 3)
    c = torch.randn(4, 3)
    assert metrics.straightness(lambda x, t, y: c, x0, 8) == pytest.approx(0.0, abs=1e-12)
    # v = 2t c: Euler with n steps gives x1 - x0 = c (n - 1)/n; per-step velocity 2 t_k c
    n = 4
    curved = metrics.straightness(lambda x, t, y: 2 * t[:, None] * c, x0, n)
    chord = c * (n - 1) / n
    expected = torch.stack([(chord - 2 * (k / n) * c).square().mean() for k in range(n)]).mean()
    assert curved == pytest.approx(expected.item(), rel=1e-5)


def test_fid_inception_layout_and_loading(tmp_path):
    model = FIDInception()
    # torchvision's Inception3 without the auxiliary head, 1008 logits: pytorch-fid's graph
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    state = model.state_dict()
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    path = tmp_path / "pt_inception.pth"
    torch.manual_seed(0)
    for module in model.modules():  # random, non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save({k: v for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}, path)  # as pytorch-fid's file
    loaded = FIDInception.from_pytorch_fid(path)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        feats = loaded.embed(x)
        torch.testing.assert_close(feats, model.eval().embed(x))
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    grey = loaded.embed(x[:, :1])
    assert grey.shape == (3, 2048)
    with pytest.raises(FileNotFoundError, match="inception"):
        FIDInception.from_pytorch_fid(tmp_path / "missing.pth")
