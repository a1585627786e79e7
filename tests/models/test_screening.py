"""Noise screening (onestep_models.screening) at tiny sizes: seeded picks independent of the
chunking, the picks are the scores' best, the teacher runs once on the picked noise, the
scorers' properties (the class head cannot read the label; the cosine; a callable), the head's
training stage and its file, FLOPs, bad input."""

import pytest
import torch
from torch import nn

from onestep_kernels.errors import ArgumentError
from onestep_models import screening as S
from onestep_models.slt import SingleLayerTransformer

SHAPE = (1, 8, 8)


def _slt(num_classes=10, patch=4, seed=0):
    torch.manual_seed(seed)
    slt = SingleLayerTransformer(input_size=8, patch_size=patch, in_channels=1, hidden_size=16,
                                 num_heads=2, depth_steps=4, num_classes=num_classes,
                                 fused=True).eval()
    with torch.no_grad():  # past adaLN-Zero's identity start, so that states depend on input
        for p in slt.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return slt


class CountingTeacher:
    """x1 = x0 / 2 + y / 10, counting its calls and samples."""

    def __init__(self):
        self.calls, self.samples = 0, 0

    def __call__(self, x0, y):
        self.calls += 1
        self.samples += x0.shape[0]
        shift = 0 if y is None else y[:, None, None, None].float() / 10
        return x0 / 2 + shift


def test_same_seed_same_picks_at_any_chunk_size():
    slt, y = _slt(), torch.tensor([3, 1, 4, 1, 5])
    results = [S.screen(slt, 1.0, CountingTeacher(), y, 7, S.CosineScorer(), shape=SHAPE,
                        seed=11, chunk_candidates=chunk) for chunk in (None, 7, 14, 1)]
    for r in results[1:]:
        assert torch.equal(r.picked, results[0].picked)
        torch.testing.assert_close(r.scores, results[0].scores)
    other = S.screen(slt, 1.0, CountingTeacher(), y, 7, S.CosineScorer(), shape=SHAPE, seed=12)
    assert not torch.equal(other.scores, results[0].scores)


def test_the_pick_is_the_best_score_and_the_teacher_runs_once_on_it():
    slt, y, teacher = _slt(), torch.tensor([0, 9, 2]), CountingTeacher()
    r = S.screen(slt, 1.0, teacher, y, 6, S.CosineScorer(), shape=SHAPE, seed=5)
    assert r.scores.shape == (3, 6) and r.picked.shape == (3,)
    assert torch.equal(r.picked, r.scores.argmax(1))
    noise = S.draw_candidates(3, 6, SHAPE, 5)
    expected = noise.view(3, 6, *SHAPE)[torch.arange(3), r.picked]
    assert torch.equal(r.noise, expected)
    assert teacher.calls == 1 and teacher.samples == 3
    torch.testing.assert_close(r.samples, teacher(expected, y))
    # the scores are the scorer's on those candidates, recomputed
    scores, _ = S.CosineScorer()(slt, noise, 1.0, y, 6)
    torch.testing.assert_close(r.scores, scores.view(3, 6))


def test_one_candidate_is_no_screening():
    slt, y = _slt(), torch.tensor([1, 2])
    r = S.screen(slt, 1.0, CountingTeacher(), y, 1, S.CosineScorer(), shape=SHAPE, seed=3)
    assert torch.equal(r.picked, torch.zeros(2, dtype=torch.long))
    assert torch.equal(r.noise, S.draw_candidates(2, 1, SHAPE, 3))


def test_the_class_head_reads_null_label_features_not_the_label():
    """The head's features come from the SLT run under the null label: the same for every
    label, so one condition's candidates are ranked by their noise, and relabelling a
    condition changes its scores only through the head's row for the new label."""
    slt = _slt()
    x0 = S.draw_candidates(1, 5, SHAPE, 0)
    a = S.null_label_features(slt, x0, 1.0)
    labelled = slt.forward_with_states(x0, torch.ones(5), torch.full((5,), 3), keep=(3,))[1][0]
    assert not torch.allclose(a, labelled)  # (the label does reach the states)
    head = nn.Linear(16, 10)
    scorer = S.ClassHeadScorer(head, source="null_state")
    s3, _ = scorer(slt, x0, 1.0, torch.tensor([3]), 5)
    s7, _ = scorer(slt, x0, 1.0, torch.tensor([7]), 5)
    logp = head(a.mean(1)).log_softmax(-1)
    torch.testing.assert_close(s3, logp[:, 3])
    torch.testing.assert_close(s7, logp[:, 7])
    assert s3.std() > 0  # not a constant within the condition


def _brightness_images(classes=4, per_class=50, seed=0):
    """Images of class c: noise around the grey level c / 2 (separable by brightness)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(per_class)
    images = torch.randn(classes * per_class, *SHAPE, generator=g) * 0.3
    return images + labels[:, None, None, None] * 0.5, labels


def test_the_preview_classifier_scores_the_slts_own_sample():
    """The default class head reads the SLT's one-step sample under the target label, through
    a classifier fitted on real images: the score is that classifier's log-probability of the
    label, its hidden layer computed before the op and its last layer in it."""
    images, labels = _brightness_images()
    classifier = S.fit_preview_classifier(images, labels, steps=300)
    assert classifier.head.weight.shape == (4, 256)
    assert classifier.accuracy > 0.9  # (on the held-out tenth)
    assert (classifier(images).argmax(1) == labels).float().mean() > 0.9
    slt = _slt(num_classes=4)
    x0, y = S.draw_candidates(2, 5, SHAPE, 1), torch.tensor([0, 3])
    scores, best = S.ClassHeadScorer(classifier)(slt, x0, 1.0, y, 5)
    preview = x0 + slt(x0, torch.ones(10), y.repeat_interleave(5))
    expected = classifier(preview).log_softmax(-1)[torch.arange(10), y.repeat_interleave(5)]
    torch.testing.assert_close(scores, expected)
    assert torch.equal(best[:, 0], scores.view(2, 5).argmax(1))
    # a linear head over the pixels is a preview head too
    linear = nn.Linear(64, 4)
    scores, _ = S.ClassHeadScorer(linear)(slt, x0, 1.0, y, 5)
    expected = linear(preview.flatten(1)).log_softmax(-1)[torch.arange(10),
                                                           y.repeat_interleave(5)]
    torch.testing.assert_close(scores, expected)
    with pytest.raises(ArgumentError, match="^source:"):
        S.ClassHeadScorer(linear, source="labels")
    with pytest.raises(TypeError, match="^head: expected an nn.Linear, got PreviewClassifier"):
        S.ClassHeadScorer(classifier, source="null_state")
    with pytest.raises(ArgumentError, match="^labels: expected classes 0..C-1"):
        S.fit_preview_classifier(images, labels + 1, steps=1)


def test_the_distilled_classifier_learns_what_the_preview_says_of_the_teachers_sample(
        tmp_path):
    """A teacher whose sample's brightness (its class, as the real-image classifier sees it)
    falls as the noise's mean rises, and an untrained SLT whose preview is the noise itself:
    the classifier of real images, reading noise around grey 0, hardly ranks the previews; the
    distilled one learns which class the teacher will draw from a preview, and
    ranks noises so. The classifier it starts from is left as it was; its file gives the same
    classifier back."""
    images, labels = _brightness_images()
    classifier = S.fit_preview_classifier(images, labels, steps=300)
    before = [p.detach().clone() for p in classifier.parameters()]
    slt = SingleLayerTransformer(input_size=8, patch_size=4, in_channels=1, hidden_size=16,
                                 num_heads=2, depth_steps=2, num_classes=4).eval()

    def teacher(x0, y):  # grey level 0.75 - 6 x the noise's mean: class 0..3 by the noise
        return x0 * 0 + 0.75 - 6 * x0.mean((1, 2, 3), keepdim=True)

    x0 = S.draw_candidates(1, 64, SHAPE, 7)
    assert torch.equal(S.slt_preview(slt, x0, 1.0, torch.zeros(64, dtype=torch.long))[:, 0],
                       x0.flatten(1))  # (adaLN-Zero: the untrained SLT draws nothing)
    student, report = S.distill_preview_classifier(classifier, slt, 1.0, teacher, 4,
                                                   shape=SHAPE, samples=2000, steps=400)
    assert report.samples == 2000 and report.spearman > 0.5, report
    assert all(torch.equal(a, b) for a, b in zip(before, classifier.parameters()))
    truth = classifier.probabilities(teacher(x0, None))[:, 3].log()
    rho = {}
    for name, model in (("real images", classifier), ("distilled", student)):
        scores, _ = S.ClassHeadScorer(model)(slt, x0, 1.0, torch.tensor([3]), 64)
        rho[name] = S._spearman(scores.numpy(), truth.numpy())
    assert rho["real images"] < 0.3 and rho["distilled"] > 0.8, rho
    S.save_head(tmp_path / "classifier.safetensors", student, {"source": "preview"})
    loaded, meta = S.load_head(tmp_path / "classifier.safetensors")
    assert isinstance(loaded, S.PreviewClassifier) and meta == {"source": "preview"}
    torch.testing.assert_close(loaded(images), student(images))


def test_unconditional_screening_with_cosine_and_a_callable():
    slt = _slt(num_classes=0)
    teacher = CountingTeacher()
    r = S.screen(slt, 1.0, teacher, None, 4, S.CosineScorer(early=0), shape=SHAPE, seed=2,
                 conditions=3)
    assert r.samples.shape == (3, *SHAPE) and teacher.samples == 3
    brightest = S.CallableScorer(lambda slt, x0, t, y: x0.flatten(1).mean(1))
    r = S.screen(slt, 1.0, CountingTeacher(), None, 4, brightest, shape=SHAPE, seed=2,
                 conditions=3)
    noise = S.draw_candidates(3, 4, SHAPE, 2).view(3, 4, -1).mean(-1)
    assert torch.equal(r.picked, noise.argmax(1))
    with pytest.raises(ArgumentError, match="^conditions:"):
        S.screen(slt, 1.0, CountingTeacher(), None, 4, S.CosineScorer(), shape=SHAPE)
    with pytest.raises(ArgumentError, match="^y: the class-head scorer"):
        S.screen(slt, 1.0, CountingTeacher(), None, 4, S.ClassHeadScorer(nn.Linear(64, 2)),
                 shape=SHAPE, conditions=2)


def test_bad_arguments_are_refused_by_name():
    slt, y = _slt(), torch.tensor([1])
    with pytest.raises(ArgumentError, match="^n_candidates:"):
        S.screen(slt, 1.0, CountingTeacher(), y, 0, S.CosineScorer(), shape=SHAPE)
    with pytest.raises(ArgumentError, match="^chunk_candidates:"):
        S.screen(slt, 1.0, CountingTeacher(), y, 2, S.CosineScorer(), shape=SHAPE,
                 chunk_candidates=0)
    with pytest.raises(ArgumentError, match="^late:"):
        S.screen(slt, 1.0, CountingTeacher(), y, 2, S.CosineScorer(late=9), shape=SHAPE)
    with pytest.raises(ArgumentError, match="^scorer: a callable scorer must return"):
        S.screen(slt, 1.0, CountingTeacher(), y, 2,
                 S.CallableScorer(lambda *a: torch.zeros(3)), shape=SHAPE)


class BrightnessLabeler:
    """Class c where an image's mean is nearest c / 10 (soft)."""

    accuracy = 1.0

    def __call__(self, images):
        mean = images.flatten(1).mean(1, keepdim=True)
        return (-(mean - torch.arange(10) / 10).abs() * 40).softmax(1)


def test_the_head_learns_what_the_noise_leads_to_and_round_trips(tmp_path):
    """With a teacher whose sample's class depends on the noise (its mean) as much as on y,
    the trained head ranks noises by the labeler's verdict on the teacher's samples, and its
    file gives the same scores back."""
    slt = _slt(patch=8)

    def teacher(x0, y):
        return x0 * 0 + x0.mean((1, 2, 3), keepdim=True) * 0.4 + y[:, None, None, None] / 20

    head, report = S.train_class_head(slt, 1.0, teacher, BrightnessLabeler(), 10, shape=SHAPE,
                                      samples=1024, seed=0)
    assert report.samples == 1024 and report.spearman > 0.3, report
    S.save_head(tmp_path / "head.safetensors", head, {"depth": -1, "report": report.spearman})
    loaded, meta = S.load_head(tmp_path / "head.safetensors")
    assert meta == {"depth": -1, "report": report.spearman}
    x0 = S.draw_candidates(2, 9, SHAPE, 4)
    y = torch.tensor([2, 6])
    a = S.ClassHeadScorer(head, source="null_state")(slt, x0, 1.0, y, 9)
    b = S.ClassHeadScorer(loaded, source="null_state")(slt, x0, 1.0, y, 9)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_flops_grow_with_candidates_tokens_and_depth():
    slt = _slt()
    one = S.screening_flops(slt, 1)
    assert S.screening_flops(slt, 8) == pytest.approx(8 * one)
    deeper = SingleLayerTransformer(input_size=8, patch_size=4, in_channels=1, hidden_size=16,
                                    num_heads=2, depth_steps=8, num_classes=10)
    assert 1.9 * one < S.screening_flops(deeper, 1) < 2 * one
    # a block application by hand: 4 tokens of 16, qkv + proj 4 D^2, MLP 2 * 4 D * D, attention
    assert one > 2 * 4 * (4 * 16 * 16 + 2 * 16 * 64) * 4


# ---- from runs on disk: `onestep sample/eval --screen N --slt RUN` ---------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-step Direct Models teacher on digits, a second teacher, and a two-step
    slt-screen-tiny distilled from the first."""
    from onestep_models import cli

    root = tmp_path_factory.mktemp("screening")
    for name, seed in (("teacher", "0"), ("other", "1")):
        assert cli.main(["train", "direct", "--out", str(root / name), "--steps", "2",
                         "--batch-size", "8", "--no-progress", "--checkpoint-every", "1",
                         "--seed", seed]) == 0
    assert cli.main(["train", "slt", "--teacher", str(root / "teacher"), "--out",
                     str(root / "slt"), "--model", "slt-screen-tiny", "--steps", "2",
                     "--batch-size", "8", "--no-progress", "--checkpoint-every", "1",
                     "--grid-size", "2"]) == 0
    return root


def test_sample_and_eval_screen_through_the_slt(runs, tmp_path, capsys, monkeypatch):
    import json

    from onestep_models import cli, screening_run

    # (the preview classifier's adaptation at a smoke size: its own test is above)
    monkeypatch.setitem(screening_run.PREVIEW_DISTILLATION, "samples", 256)
    monkeypatch.setitem(screening_run.PREVIEW_DISTILLATION, "steps", 20)

    from onestep_models.run_dir import latest_checkpoint, read_checkpoint_state

    # (the screening size loops a quarter of the teacher's layers, fusing up to 4 states)
    def model(run):
        return read_checkpoint_state(latest_checkpoint(run))["config"]["model"]

    layers, slt = model(runs / "teacher")["depth"], model(runs / "slt")
    K = max(1, round(layers / 4))
    assert (slt["depth_steps"], slt["fusion_states"], slt["patch_size"]) == (K, min(4, K), 4)
    png = tmp_path / "grid.png"
    head = runs / "slt" / "screening_head_preview.safetensors"
    head.unlink(missing_ok=True)
    capsys.readouterr()
    sample = ["sample", "--ckpt", str(runs / "teacher"), "--screen", "8", "--slt",
              str(runs / "slt"), "--num", "4", "--out", str(png)]
    assert cli.main(sample) == 0
    assert png.stat().st_size > 0
    assert head.exists()  # fitted once, kept; the slow first use says so
    assert "fitting the 'preview' screening head" in capsys.readouterr().err
    assert cli.main(sample) == 0
    assert "fitting" not in capsys.readouterr().err
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", "--ckpt", str(runs / "teacher"), "--screen", "4", "--slt",
                     str(runs / "slt"), "--scorer", "cosine", "--num", "20", "--out",
                     str(out)]) == 0
    samplers = json.loads(out.read_text())["samplers"]
    assert {"direct_1step", "screened_4"} <= set(samplers)
    assert set(samplers["screened_4"]) >= {"digits_fd", "class_accuracy"}


@pytest.mark.parametrize("extra,message", [
    (["--screen", "4"], "--screen: needs --slt RUN"),
    (["--slt", "SLT"], "--slt: goes with --screen N"),
    (["--screen", "0", "--slt", "SLT"], "--screen: expected > 0"),
    (["--screen", "4", "--slt", "TEACHER"], "is a 'direct' run, not an SLT"),
    (["--screen", "4", "--slt", "SLT", "--ckpt", "OTHER"], "distilled from another teacher"),
    (["--screen", "4", "--slt", "SLT", "--ckpt", "SLT"], "--ckpt: "),
])
def test_bad_screening_combinations_are_one_line_exit_2(runs, tmp_path, capsys, extra, message):
    from onestep_models import cli

    names = {"SLT": str(runs / "slt"), "TEACHER": str(runs / "teacher"),
             "OTHER": str(runs / "other")}
    extra = [names.get(a, a) for a in extra]
    ckpt = ["--ckpt", str(runs / "teacher")] if "--ckpt" not in extra else []
    capsys.readouterr()
    assert cli.main(["sample", *ckpt, *extra, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA-graph replay)")
def test_cuda_screening_replays_graphs_and_picks_what_the_cpu_picks():
    """On CUDA the scoring and the teacher replay from CUDA graphs (captured once, replayed
    after), and with CPU-drawn noise the picks are the CPU's, in fp32."""
    slt, y = _slt(), torch.tensor([3, 1, 4])

    def teacher(x0, labels):
        return x0 / 2 + labels[:, None, None, None].float() / 10

    cpu = S.screen(slt, 1.0, teacher, y, 16, S.CosineScorer(), shape=SHAPE, seed=9)
    screener = S.Screener(slt.cuda(), 1.0, teacher, S.CosineScorer(), 16, shape=SHAPE)
    first = screener(y.cuda(), seed=9)
    second = screener(y.cuda(), seed=9)
    assert screener.score.num_graphs == 1 and screener.sample.num_graphs == 1
    for r in (first, second):
        assert torch.equal(r.picked.cpu(), cpu.picked)
        torch.testing.assert_close(r.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r.samples.cpu(), cpu.samples)
