"""SlimFlow: the β schedules, the annealed noise, the guidance target on a flow with a known
solution, pair shards that resume, and both stages' losses decreasing on a fixed batch."""

import math

import pytest
import torch
from torch import nn

from onestep_models import slimflow, train
from onestep_models.dit import FlowDiT


@pytest.mark.parametrize("schedule,mid", [("linear", 0.5), ("exp", math.exp(-0.5)),
                                          ("cos", 0.5)])
def test_annealing_beta_endpoints_and_midpoint(schedule, mid):
    assert slimflow.annealing_beta(0, 100, schedule) == pytest.approx(1.0)
    assert slimflow.annealing_beta(50, 100, schedule) == pytest.approx(mid)
    end = slimflow.annealing_beta(100, 100, schedule)
    assert end == pytest.approx(math.exp(-1) if schedule == "exp" else 0.0)
    assert slimflow.annealing_beta(10**6, 100, "linear") == 0.0
    assert slimflow.annealing_beta(5, 0) == 0.0  # no annealing: plain reflow
    with pytest.raises(ValueError, match="schedule"):
        slimflow.annealing_beta(0, 10, "square")


def test_annealed_noise_is_standard_normal_and_the_pair_at_beta_0():
    g = torch.Generator().manual_seed(0)
    z0, xi = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    mixed = slimflow.anneal_noise(z0, xi, 0.6)
    assert abs(mixed.std().item() - 1.0) < 0.01
    assert torch.equal(slimflow.anneal_noise(z0, xi, 0.0), z0)


class PointMassFlow(nn.Module):
    """The exact flow field of data concentrated at `a`: v(x, t) = (a - x) / (1 - t)."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, t, y=None):
        return (self.a - x) / (1 - t).reshape(-1, *([1] * (x.dim() - 1)))


def test_guidance_target_lands_where_the_guide_flow_does():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 3, 4, 4, generator=g)
    z, v_z = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.rand(5, generator=g) * 0.6 + 0.2
    target = slimflow.guidance_target(PointMassFlow(a), z, v_z, t, None)
    torch.testing.assert_close(target, a.expand_as(target), rtol=1e-5, atol=1e-5)


def test_pseudo_huber():
    a = torch.randn(4, 1, 8, 8)
    assert torch.allclose(slimflow.pseudo_huber(a, a), torch.zeros(4))
    b = a + 3.0
    far = slimflow.pseudo_huber(a, b)
    torch.testing.assert_close(far, (a - b).flatten(1).norm(dim=1), rtol=1e-3, atol=1e-2)


def tiny_dit(width=32):
    torch.manual_seed(0)
    model = FlowDiT(input_size=4, patch_size=2, in_channels=1, hidden_size=width, depth=1,
                    num_heads=2, num_classes=3, class_dropout_prob=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_pair_shards_resume_without_redoing_finished_ones(tmp_path):
    teacher = tiny_dit()
    kwargs = dict(num=10, shape=(1, 4, 4), num_classes=3, shard_size=4, heun_steps=2, seed=3)
    slimflow.generate_pairs(teacher, tmp_path / "whole", **kwargs)
    out = tmp_path / "resumed"
    slimflow.generate_pairs(teacher, out, **kwargs)
    import shutil
    shutil.rmtree(out / "shard_00001")  # as if killed while writing it
    (out / ".tmp_shard_00001").mkdir()
    kept = (out / "shard_00000" / "x1.npy").stat().st_mtime_ns
    made = []
    slimflow.generate_pairs(teacher, out, **kwargs, progress=lambda i, n: made.append(i))
    assert made == [2]  # only the missing shard
    assert (out / "shard_00000" / "x1.npy").stat().st_mtime_ns == kept
    assert not list(out.glob(".tmp_*"))
    (a, manifest), (b, _) = slimflow.load_pairs(tmp_path / "whole"), slimflow.load_pairs(out)
    assert len(a) == 10 and manifest["num_classes"] == 3
    for ta, tb in zip(a.tensors, b.tensors):
        assert torch.equal(ta, tb)
    x1, y, z0 = a.tensors
    assert x1.shape == z0.shape == (10, 1, 4, 4) and y.tolist()[:4] == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="other settings"):
        slimflow.generate_pairs(teacher, out, **{**kwargs, "heun_steps": 3})


DAMAGES = {
    "truncated x1": ("x1.npy", lambda b: b[: len(b) // 2], "bytes"),
    "zero-byte y": ("y.npy", lambda b: b"", "bytes"),
    "x1 overwritten with 0x7f": ("x1.npy", lambda b: b[:128] + b"\x7f" * (len(b) - 128),
                                 "sha256 mismatch"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_shard_is_refused_by_name_and_redrawn_on_rerun(tmp_path, capsys, damage):
    """On the parent commit: `onestep pairs` reran over these and reported the full count,
    and training read them (an mmap error naming no file, an EOFError traceback, or silently
    wrong values blamed later on the learning rate)."""
    teacher = tiny_dit()
    kwargs = dict(num=10, shape=(1, 4, 4), num_classes=3, shard_size=4, heun_steps=2, seed=3)
    out = tmp_path / "pairs"
    slimflow.generate_pairs(teacher, out, **kwargs)
    whole, _ = slimflow.load_pairs(out)
    name, change, why = DAMAGES[damage]
    path = out / "shard_00001" / name
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(ValueError, match=f"^--pairs: {path} .*{why}"):
        slimflow.load_pairs(out)
    capsys.readouterr()
    made = []
    slimflow.generate_pairs(teacher, out, **kwargs, progress=lambda i, n: made.append(i))
    assert made == [2]  # that shard alone, drawn again (seeded: the same pairs)
    assert f"redrawing shard 1: {path}" in capsys.readouterr().err
    again, _ = slimflow.load_pairs(out)
    for a, b in zip(whole.tensors, again.tensors):
        assert torch.equal(a, b)


def test_shards_from_before_digests_are_checked_then_fingerprinted(tmp_path, capsys):
    import numpy as np

    teacher = tiny_dit()
    kwargs = dict(num=8, shape=(1, 4, 4), num_classes=3, shard_size=4, heun_steps=2, seed=3)
    out = tmp_path / "pairs"
    slimflow.generate_pairs(teacher, out, **kwargs)
    for shard in ("shard_00000", "shard_00001"):
        (out / shard / slimflow.SHARD_MANIFEST).unlink()
    x1 = np.load(out / "shard_00001" / "x1.npy")
    x1[0, 0, 0, 0] = np.nan
    np.save(out / "shard_00001" / "x1.npy", x1)
    capsys.readouterr()
    with pytest.raises(ValueError, match="shard_00001/x1.npy holds non-finite values"):
        slimflow.load_pairs(out)  # non-finite data is refused at load, by file
    assert "shard_00000 has no shard.json" in capsys.readouterr().err
    assert (out / "shard_00000" / slimflow.SHARD_MANIFEST).is_file()  # fingerprinted once


def test_processes_share_the_shards_of_one_directory(tmp_path):
    """Under torchrun each process draws the shards of its rank modulo the world size into the
    same directory: together, the pairs one process draws (the same files, bit for bit), and
    no process touches another's shards, finished or half-written."""
    teacher = tiny_dit()
    kwargs = dict(num=10, shape=(1, 4, 4), num_classes=3, shard_size=3, heun_steps=2, seed=3)
    slimflow.generate_pairs(teacher, tmp_path / "one", **kwargs)
    out = tmp_path / "two"
    out.mkdir()
    (out / ".tmp_shard_00001").mkdir()  # rank 1's shard, being written
    made = []
    slimflow.generate_pairs(teacher, out, **kwargs, part=(0, 2),
                            progress=lambda i, n: made.append(i))
    assert made == [1, 3] and (out / ".tmp_shard_00001").is_dir()
    with pytest.raises(ValueError, match="incomplete"):
        slimflow.load_pairs(out)
    slimflow.generate_pairs(teacher, out, **kwargs, part=(1, 2),
                            progress=lambda i, n: made.append(i))
    assert made == [1, 3, 2, 4] and not list(out.glob(".tmp_*"))
    (a, _), (b, _) = slimflow.load_pairs(tmp_path / "one"), slimflow.load_pairs(out)
    for ta, tb in zip(a.tensors, b.tensors):
        assert torch.equal(ta, tb)
    with pytest.raises(ValueError, match="part"):
        slimflow.generate_pairs(teacher, out, **kwargs, part=(2, 2))


def fixed_batch():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(16, 1, 4, 4, generator=g).clamp(-1, 1),
            torch.randint(0, 3, (16,), generator=g), torch.randn(16, 1, 4, 4, generator=g))


def losses_on_a_fixed_batch(recipe, steps=30):
    x1, y, z0 = fixed_batch()
    params = [p for p in recipe.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for step in range(steps):
        rng = train.BatchRandom(7, 16, step=step)  # the same draws every step
        loss, _ = recipe.loss(x1, y, rng, z0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("anneal_steps", [0, 10])
def test_annealing_reflow_loss_decreases(anneal_steps):
    recipe = slimflow.AnnealingReflow(tiny_dit(), 3, anneal_steps=anneal_steps, hflip=True)
    losses = losses_on_a_fixed_batch(recipe)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("guidance", [True, False])
def test_flow_guided_distillation_loss_decreases_and_leaves_the_guide(guidance):
    guide = tiny_dit()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    recipe = slimflow.FlowGuidedDistillation(tiny_dit(), guide, 3, guidance=guidance)
    losses = losses_on_a_fixed_batch(recipe)
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in recipe.guide.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_students_report_parameters_and_macs():
    from onestep_models import recipes

    sizes = {}
    for name in ("tiny", "slim-32"):
        kwargs = recipes.model_kwargs(name, (1, 8, 8), 10)
        model = FlowDiT(**kwargs)
        x, t, y = torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([3])
        sizes[name] = (sum(p.numel() for p in model.parameters()),
                       slimflow.count_macs(model, x, t, y))
    assert sizes["slim-32"][0] <= sizes["tiny"][0] / 3.5
    assert 0 < sizes["slim-32"][1] < sizes["tiny"][1] / 3


def test_lpips_structure_and_gradients_with_random_weights(tmp_path):
    """No real LPIPS/VGG weights exist offline: the module is checked with random ones for
    its structure (five taps of VGG16's widths), the distance's properties, the file format
    it loads, and gradients reaching the student's side."""
    from onestep_models.lpips import LPIPS, TAPS

    torch.manual_seed(0)
    lpips = LPIPS(size=32)
    with torch.no_grad():
        for lin in lpips.lins:
            lin.weight.uniform_(0, 1)  # LPIPS' heads are non-negative
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    taps = lpips._taps(x)
    assert [t.shape[1] for t in taps] == list(TAPS)
    assert [t.shape[-1] for t in taps] == [32, 16, 8, 4, 2]
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.allclose(lpips(a, a), torch.zeros(3), atol=1e-6)
    d = lpips(a, b)
    assert (d > 0).all() and torch.allclose(d, lpips(b, a))
    a.requires_grad_()
    lpips(a, b).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    # the two files it loads: torchvision's VGG16 keys and lpips' lin heads
    torch.save({f"features.{k}": v for k, v in lpips.features.state_dict().items()},
               tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(lpips.lins)},
               tmp_path / "vgg.pth")
    loaded = LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "vgg.pth", size=32)
    torch.testing.assert_close(loaded(a.detach(), b), d)
    recipe = slimflow.FlowGuidedDistillation(tiny_dit(), tiny_dit(), 3, distance=lpips)
    assert losses_on_a_fixed_batch(recipe, steps=3)[0] > 0


def test_pairs_by_rk45_agree_with_fine_heun(tmp_path):
    teacher = tiny_dit()
    kwargs = dict(num=4, shape=(1, 4, 4), num_classes=3, shard_size=4, seed=5)
    slimflow.generate_pairs(teacher, tmp_path / "rk45", solver="rk45", **kwargs)
    slimflow.generate_pairs(teacher, tmp_path / "heun", heun_steps=64, **kwargs)
    (a, manifest), (b, _) = (slimflow.load_pairs(tmp_path / name) for name in ("rk45", "heun"))
    assert manifest["solver"] == "rk45" and torch.equal(a.tensors[2], b.tensors[2])
    torch.testing.assert_close(a.tensors[0], b.tensors[0], rtol=1e-2, atol=3e-3)
    with pytest.raises(ValueError, match="solver"):
        slimflow.generate_pairs(teacher, tmp_path / "x", solver="euler", **kwargs)


def test_a_full_disk_while_drawing_pairs_names_the_shard_and_leaves_no_temporary(
        tmp_path, monkeypatch):
    """np.save raising ENOSPC on the second shard: a MachineError naming the shard (on the
    parent commit "[Errno 28] No space left on device" without a file, and a temporary left);
    the first shard stands, and a rerun finishes the rest."""
    import errno
    import os

    import numpy as np

    from onestep_kernels.errors import MachineError

    teacher = tiny_dit()
    kwargs = dict(num=8, shape=(1, 4, 4), num_classes=3, shard_size=4, heun_steps=2, seed=3)
    out = tmp_path / "pairs"
    real_save, calls = np.save, []

    def save(path, array):
        calls.append(path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(path, array)

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(MachineError,
                       match=f"no space left on the device writing {out}/shard_00001"):
        slimflow.generate_pairs(teacher, out, **kwargs)
    assert not list(out.glob(".tmp_*")) and (out / "shard_00000").is_dir()
    monkeypatch.setattr(np, "save", real_save)
    slimflow.generate_pairs(teacher, out, **kwargs)
    assert len(slimflow.load_pairs(out)[0]) == 8
