"""Noise screening from runs on disk: a teacher run and an SLT run distilled from it, made
into a screened sampler (`onestep sample --screen N --slt RUN`, `onestep eval ... --screen
N`), and the screening table of the SLT demo (digits-FD, accuracy, per-class recall, the
judge's log-probability of the target class, against N; the within-class Spearman
correlation of the SLT's scores with the judge's; a PNG plot).

The judge (onestep_models.metrics' digits classifier) only evaluates here: the scorers never
see it (onestep_models.screening).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from onestep_kernels.errors import ArgumentError
from onestep_kernels.errors import UserError as UsageError  # (exit 2, one line)
from onestep_models import recipes, screening
from onestep_models.run_dir import latest_checkpoint, load_weights, read_checkpoint_state

SCORERS = ("preview", "null_state", "cosine")

# The preview classifier's adaptation to an SLT (screening.distill_preview_classifier): about a
# minute on the digits, once per SLT checkpoint (the demo scales it down with its --steps).
PREVIEW_DISTILLATION = {"samples": 100_000, "steps": 10_000}


class ScreenedSampler:
    """(x0, y) -> the teacher's samples from each condition's best of N screened noises (x0
    gives the number of samples; the candidates are drawn from `seed`), one
    `screening.Screener` across calls (its CUDA graphs replayed)."""

    def __init__(self, slt, slt_time: float, teacher, scorer, n_candidates: int,
                 shape: tuple[int, ...], seed: int, cuda_graphs: bool = True):
        self.screener = screening.Screener(slt, slt_time, teacher, scorer, n_candidates,
                                           shape=shape, cuda_graphs=cuda_graphs)
        self.seed = seed
        self.last: screening.ScreeningResult | None = None

    def __call__(self, x0: Tensor, y: Tensor | None) -> Tensor:
        self.last = self.screener(y, conditions=x0.shape[0], seed=self.seed)
        return self.last.samples


def _one_step(network, time_value: float):
    def sample(x0: Tensor, y: Tensor | None) -> Tensor:
        t = torch.full((x0.shape[0],), time_value, dtype=x0.dtype, device=x0.device)
        return x0 + network(x0, t, y)
    return sample


def load_screening(teacher_ckpt: Path, slt_run: Path, device: torch.device,
                   scorer: str = "preview", cuda_graphs: bool = True,
                   distillation: dict[str, int] | None = None) -> dict[str, Any]:
    """The pieces of a screened sampler: {"slt", "slt_time", "teacher", "scorer", "shape",
    "num_classes", "head"}; one-line UsageErrors for runs that do not fit together.
    `distillation`: settings of the preview classifier's (`PREVIEW_DISTILLATION`'s keys)."""
    if slt_run is None:
        raise UsageError("--screen: needs --slt RUN (an SLT distilled from this teacher)")
    if scorer not in SCORERS:
        raise UsageError(f"--scorer: expected one of {', '.join(SCORERS)}, got {scorer!r}")
    for flag, path in (("--ckpt", teacher_ckpt), ("--slt", slt_run)):
        if not Path(path).exists():
            raise UsageError(f"{flag}: no such file or directory: {path}")
    checkpoint = latest_checkpoint(slt_run)
    if checkpoint is None:
        raise UsageError(f"--slt: no checkpoint under {slt_run}")
    run = read_checkpoint_state(checkpoint)["config"]
    if run.get("recipe") != "slt":
        raise UsageError(f"--slt: {slt_run} is a {run.get('recipe')!r} run, not an SLT "
                         "(onestep train slt --teacher ...)")
    try:
        network, teacher = recipes.load_one_step_teacher(teacher_ckpt, device)
    except (ArgumentError, FileNotFoundError) as err:  # (its messages name --teacher)
        raise UsageError("--ckpt: " + str(err).removeprefix("--teacher: ")) from None
    recorded = run["options"]["teacher"]["digest"]
    if teacher["digest"] != recorded:
        raise UsageError(f"--slt: {slt_run} was distilled from another teacher (sha256 "
                         f"{recorded[:12]}...) than --ckpt {teacher_ckpt} "
                         f"({str(teacher['digest'])[:12]}...)")
    teacher_model, slt_model = teacher["run"]["model"], run["model"]
    shape = (teacher_model["in_channels"], teacher_model["input_size"],
             teacher_model["input_size"])
    if (slt_model["in_channels"], slt_model["input_size"], slt_model["input_size"]) != shape:
        raise UsageError(f"--slt: its data shape {slt_model['in_channels']}x"
                         f"{slt_model['input_size']} is not the teacher's {shape}")
    recipe = recipes.build(run, training=False)
    load_weights(recipe, checkpoint, "ema")
    slt = recipe.student.to(device).eval()
    num_classes = slt.num_classes
    if scorer != "cosine" and num_classes == 0:
        raise UsageError(f"--scorer: {scorer} scores labels; this model is unconditional "
                         "(--scorer cosine)")
    head = None
    if scorer == "cosine":
        chosen = screening.CosineScorer()
    else:
        head = screening_head(Path(slt_run), scorer, teacher, network, slt,
                              float(teacher["time"]), str(Path(checkpoint).resolve()),
                              distillation)
        chosen = screening.ClassHeadScorer(head.to(device), source=scorer)
    return {"slt": slt, "slt_time": float(teacher["time"]),
            "teacher": _one_step(network, float(teacher["time"])), "scorer": chosen,
            "shape": shape, "num_classes": num_classes, "head": head,
            "cuda_graphs": cuda_graphs, "teacher_run": teacher["run"]}


def screened_sampler(pieces: dict[str, Any], n_candidates: int, seed: int) -> ScreenedSampler:
    return ScreenedSampler(pieces["slt"], pieces["slt_time"], pieces["teacher"],
                           pieces["scorer"], n_candidates, pieces["shape"], seed,
                           pieces["cuda_graphs"])


def screening_head(slt_run: Path, source: str, teacher: dict, network, slt,
                   slt_time: float, slt_checkpoint: str,
                   distillation: dict[str, int] | None = None):
    """The class head for `source`, fitted once and kept in the SLT run directory
    (screening_head_<source>.safetensors, written atomically; refitted when what it was
    fitted from differs): "preview" a `PreviewClassifier` fitted on the teacher's real
    training images and distilled on this SLT's previews, "null_state" `train_class_head`
    with that real-image classifier as the labeler. Both depend on the teacher and on this
    SLT checkpoint."""
    path = slt_run / f"screening_head_{source}.safetensors"
    meta: dict[str, Any] = {"source": source, "teacher_digest": teacher["digest"],
                            "slt_checkpoint": slt_checkpoint,
                            "classifier": "preview-mlp-256"}
    if source == "preview":
        meta["distillation"] = {**PREVIEW_DISTILLATION, **(distillation or {})}
    if path.exists():
        head, recorded = screening.load_head(path)
        if all(recorded.get(key) == value for key, value in meta.items()):
            return head
    # (the first use of an SLT run is slow: say why, where the result will be kept)
    print(f"onestep: fitting the '{source}' screening head for this SLT and teacher once "
          f"(about a minute on digits); kept in {path}", file=sys.stderr)
    dataset, num_classes = recipes.load_data(recipes.real_data(teacher["run"]["data"]))
    images, labels = dataset.tensors[0], dataset.tensors[1]
    classifier = screening.fit_preview_classifier(images, labels)
    teacher_sample = _one_step(network, teacher["time"])
    shape = tuple(images.shape[1:])
    if source == "preview":
        head, report = screening.distill_preview_classifier(
            classifier, slt, slt_time, teacher_sample, num_classes, shape=shape,
            **meta["distillation"])
    else:
        head, report = screening.train_class_head(
            slt, slt_time, teacher_sample, classifier.probabilities, num_classes, shape=shape)
    meta["report"] = {k: float(v) for k, v in vars(report).items()}
    screening.save_head(path, head.cpu(), meta)
    return head


# ---------------------------------------------------------------------------------------------
# The screening table (the SLT demo's, on digits)
# ---------------------------------------------------------------------------------------------


def _recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> float:
    """The fraction of real feature vectors inside the generated ones' k-NN balls (improved
    recall, Kynkäänniemi et al. 2019): where a scorer drops a mode, recall falls."""
    fake_t, real_t = torch.from_numpy(fake), torch.from_numpy(real)
    radii = torch.cdist(fake_t, fake_t).kthvalue(k + 1, dim=1).values
    return (torch.cdist(real_t, fake_t) <= radii[None]).any(1).double().mean().item()


def screening_table(pieces: dict[str, Any], device: torch.device, ns=(1, 8, 32, 128),
                    per_class: int = 100, seed: int = 1) -> dict[str, Any]:
    """For each N: the teacher's samples from screened noise (N = 1: random noise, the
    baseline), `per_class` per class, judged by the digits classifier: digits-FD, class
    accuracy, mean log-probability of the target class, per-class accuracy and recall; and
    the within-class Spearman correlation of the SLT's scores of 100 noises per class with
    the judge's log-probability of the teacher's samples from them."""
    from scipy.stats import spearmanr

    from onestep_models import metrics
    from onestep_models.data import digits

    judge = metrics.load_classifier().to(device)
    dataset = digits()
    real, real_labels = dataset.tensors
    real_features = metrics.features(judge, real.to(device))
    classes = pieces["num_classes"]
    y = torch.arange(classes, device=device).repeat_interleave(per_class)
    rows = []
    for n in ns:
        sampler = screened_sampler(pieces, n, seed)
        start = time.perf_counter()
        with torch.no_grad():
            images = sampler(torch.empty(len(y), device=device), y).clamp(-1, 1)
            logits = judge(images)
        seconds = time.perf_counter() - start
        fake_features = metrics.features(judge, images)
        predicted = logits.argmax(1)
        per_class_accuracy, per_class_recall = [], []
        for c in range(classes):
            mine = y == c
            per_class_accuracy.append((predicted[mine] == c).double().mean().item())
            per_class_recall.append(_recall(real_features[(real_labels == c).numpy()],
                                            fake_features[mine.cpu().numpy()]))
        rows.append({
            "n": n, "seconds": round(seconds, 2),
            "digits_fd": metrics.frechet_distance(fake_features, real_features),
            "class_accuracy": (predicted == y).double().mean().item(),
            "target_logp": logits.log_softmax(1).gather(1, y[:, None]).mean().item(),
            "per_class_accuracy": per_class_accuracy, "per_class_recall": per_class_recall})
    x0 = screening.draw_candidates(classes, 100, pieces["shape"], seed + 1000).to(device)
    labels = torch.arange(classes, device=device)
    with torch.no_grad():
        scores, _ = pieces["scorer"](pieces["slt"], x0, pieces["slt_time"], labels, 100)
        repeated = labels.repeat_interleave(100)
        judged = judge(pieces["teacher"](x0, repeated).clamp(-1, 1)).log_softmax(1)
        judged = judged.gather(1, repeated[:, None])[:, 0]
    rho = [float(spearmanr(scores.view(classes, 100)[c].cpu().numpy(),
                           judged.view(classes, 100)[c].cpu().numpy()).statistic)
           for c in range(classes)]
    return {"rows": rows, "spearman": float(np.nanmean(rho)), "spearman_per_class": rho}


def screening_bars(table: dict[str, Any]) -> dict[str, bool]:
    """The issue's quality bars, from the table (N = 1 is random noise)."""
    rows = {r["n"]: r for r in table["rows"]}
    base = rows[1]
    bars = {}
    for n, r in rows.items():
        if n >= 8:
            bars[f"N={n}: accuracy and target log-probability above random noise's"] = (
                r["class_accuracy"] > base["class_accuracy"]
                and r["target_logp"] > base["target_logp"])
    if 8 in rows:
        bars["N=8: digits-FD <= 1.1x random noise's"] = (
            rows[8]["digits_fd"] <= 1.1 * base["digits_fd"])
    bars["within-class Spearman(SLT score, judge log-probability) >= 0.5"] = (
        table["spearman"] >= 0.5)
    return bars


def print_screening_table(table: dict[str, Any]) -> None:
    print(f"{'N':>5}{'digits-FD':>11}{'accuracy':>10}{'log p(y)':>10}"
          f"{'min class acc':>15}{'min recall':>12}{'mean recall':>13}{'seconds':>9}")
    for r in table["rows"]:
        print(f"{r['n']:>5}{r['digits_fd']:>11.3f}{r['class_accuracy']:>10.3f}"
              f"{r['target_logp']:>10.4f}{min(r['per_class_accuracy']):>15.2f}"
              f"{min(r['per_class_recall']):>12.2f}"
              f"{np.mean(r['per_class_recall']):>13.3f}{r['seconds']:>9.2f}")
    print(f"within-class Spearman correlation of the SLT's scores with the judge's log p(y): "
          f"{table['spearman']:.3f}")


def plot_screening_table(table: dict[str, Any], path: Path) -> None:
    """digits-FD, accuracy and per-class recall against N, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in table["rows"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(ns, [r["digits_fd"] for r in table["rows"]], "o-")
    axes[0].set_title("digits-FD (lower is better)")
    axes[1].plot(ns, [r["class_accuracy"] for r in table["rows"]], "o-")
    axes[1].set_title("class accuracy")
    recalls = np.array([r["per_class_recall"] for r in table["rows"]])
    for c in range(recalls.shape[1]):
        axes[2].plot(ns, recalls[:, c], ".-", alpha=0.6, label=str(c))
    axes[2].set_title("per-class recall")
    axes[2].legend(ncol=5, fontsize=7)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("candidates N (1: random noise)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
