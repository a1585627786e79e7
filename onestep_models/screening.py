"""Noise screening with a Single-Layer Transformer: for each condition, draw N noises, score
them all with the cheap SLT, and give the teacher only the best one.

One-step generators are fast but uneven: some noises give poor samples. The SLT paper's
point (arXiv 2601.11630) is that its tiny model screens 100+ noises in the time of about two
teacher samples; FreeFlow (arXiv 2511.19428) searched noise with its own one-step student.
Neither publishes its scorer: here a scorer is pluggable, and three come with the module.

    result = screen(slt, slt_time, teacher, y, 128, scorer, shape=(4, 32, 32), seed=0)
    result.samples        # (B, C, H, W): the teacher's samples from the picked noises

The SLT runs over all B * N candidates in batches of whole conditions (`chunk_candidates`, or
as many as `memory_budget` bytes of activations allow, at least one condition), each batch
scored and reduced to its conditions' picks by `onestep_kernels.score_candidates` (one pass
over the features); the teacher then runs once, on the B picked noises. On CUDA the SLT's
scoring and the teacher are each replayed from a CUDA graph (`onestep_kernels.cuda_graph`,
one memory pool). The noises are drawn on the CPU from one seeded generator, in condition
order, so the same seed gives the same candidates, and the same picks, on every device and
at every chunk size.

Scorers (what each rewards; README "Noise screening" has their numbers on the digits):
- `ClassHeadScorer` (the default where there are labels): the log-probability of the target
  label under a class head with a log-softmax. Source "preview" (default): a small classifier
  (`PreviewClassifier`: one hidden layer) reads the SLT's own one-step sample under the target
  label. It is fitted on the teacher's real images (`fit_preview_classifier`), then adapted
  to this SLT's previews (`distill_preview_classifier`: it learns the real-image classifier's
  view of the teacher's sample from the same noise). It rewards noises whose cheap preview
  already looks like the target class, as that classifier would see the teacher's sample.
  Source "null_state": a linear head reads the SLT's pooled state run under the NULL label
  (its own evidence: under the target label the features carry the label through adaLN, and
  a head trained on them would read the conditioning back), trained by `train_class_head` to
  predict the class of the teacher's sample from the same noise as the real-image classifier
  sees it. (Measured on the digits it ranks by nothing: a teacher that obeys its label draws
  that class from almost any noise, so there is little for it to learn.)
- `CosineScorer` (label-free): the cosine between the SLT's pooled features at an
  intermediate depth and at its last application: how settled the representation is by
  mid-depth, a proxy for a noise the block maps without hesitation.
- `CallableScorer`: a user's function (slt, x0, t, y) -> (M,) scores, higher is better.

None of these may use the classifier behind digits-FD and accuracy (onestep_models.metrics):
selecting by the judge's own features would make the quality bar circular. It only evaluates.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import onestep_kernels as ok
from onestep_kernels.cuda_graph import CUDAGraphed
from onestep_kernels.errors import ArgumentError, ArgumentTypeError
from onestep_kernels.ops.score_candidates import top_k_reference
from onestep_models.slt import SingleLayerTransformer

# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------


def draw_candidates(conditions: int, n_candidates: int, shape: tuple[int, ...],
                    seed: int) -> Tensor:
    """(conditions * n_candidates, *shape) standard normal noise on the CPU, condition b's
    candidates at rows b * N .. b * N + N - 1, from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(conditions * n_candidates, *shape, generator=generator)


def candidate_bytes(slt: SingleLayerTransformer, dtype: torch.dtype) -> int:
    """A bound on one candidate's activation memory in an SLT forward without gradients: the
    state, the attention's q, k, v and output, the MLP's hidden layer (mlp_ratio x width) and
    the attention scores where they are materialised (heads x tokens^2, fp32)."""
    block = slt.block
    tokens = slt.x_embedder.num_patches
    width = block.hidden_size
    hidden = block.mlp.fc1.out_features
    element = torch.finfo(dtype).bits // 8
    heads = block.attn.num_heads
    return tokens * (8 * width + 2 * hidden) * element + heads * tokens * tokens * 4


# ---------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------


def _time(x0: Tensor, t: float) -> Tensor:
    return torch.full((x0.shape[0],), t, dtype=x0.dtype, device=x0.device)


def _null_labels(slt: SingleLayerTransformer, x0: Tensor) -> Tensor | None:
    if slt.num_classes == 0:
        return None
    return torch.full((x0.shape[0],), slt.num_classes, dtype=torch.long, device=x0.device)


def _check_depth(slt: SingleLayerTransformer, depth: int, name: str) -> int:
    K = slt.depth_steps
    if isinstance(depth, bool) or not isinstance(depth, int) or not -K <= depth < K:
        raise ArgumentError(f"{name}: expected an application index in -{K}..{K - 1}, got "
                            f"{depth!r}")
    return depth % K


def null_label_features(slt: SingleLayerTransformer, x0: Tensor, t: float,
                        depth: int = -1) -> Tensor:
    """The SLT's (M, T, D) state after application `depth`, run under the null label
    (unconditioned): the features a class head reads."""
    depth = _check_depth(slt, depth, "depth")
    _, states = slt.forward_with_states(x0, _time(x0, t), _null_labels(slt, x0), keep=(depth,))
    return states[0]


def slt_preview(slt: SingleLayerTransformer, x0: Tensor, t: float,
                labels: Tensor | None) -> Tensor:
    """The SLT's own one-step sample x0 + SLT(x0, t, y), flattened to one (M, 1, C H W)
    token: what a class head on images reads."""
    return (x0 + slt(x0, _time(x0, t), labels)).flatten(1).unsqueeze(1)


SOURCES = ("preview", "null_state")


class PreviewClassifier(nn.Module):
    """A small classifier of images (or latents) of one shape: flatten, a hidden layer
    (Linear + GELU: `embed`, the features the scoring op pools) and a linear class head
    (`head`, the op's). `fit_preview_classifier` trains it on real images;
    `distill_preview_classifier` adapts it to an SLT's previews."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.GELU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.embed(images))

    def probabilities(self, images: Tensor) -> Tensor:
        """(n, classes) class probabilities, on the classifier's device (a labeler)."""
        weight = self.head.weight
        with torch.no_grad():
            return self(images.to(weight.device, weight.dtype)).softmax(-1)


class ClassHeadScorer(nn.Module):
    """log p(target | features) under a linear class head with a log-softmax.

    source "preview" (the default): `head` is a `PreviewClassifier` (or an nn.Linear over the
        flattened pixels) that reads the SLT's one-step sample under the target label: the
        classifier's hidden layer is computed from the preview, and the scoring op applies its
        last layer. It rewards noises whose cheap preview already looks like the target
        class, as a classifier of real images that was adapted to this SLT's previews sees it
        (`distill_preview_classifier`).
    source "null_state": `head` (an nn.Linear) reads the SLT's pooled state after
        application `depth` run under the NULL label (its own evidence, not its
        conditioning), trained by `train_class_head` to predict the class of the teacher's
        sample from the same noise.
    """

    name = "class_head"

    def __init__(self, head: nn.Module, source: str = "preview", depth: int = -1):
        super().__init__()
        if source not in SOURCES:
            raise ArgumentError(f"source: expected one of {SOURCES}, got {source!r}")
        embed = None
        if isinstance(head, PreviewClassifier) and source == "preview":
            embed, head = head.embed, head.head
        if not isinstance(head, nn.Linear):
            wanted = "a PreviewClassifier or an nn.Linear" if source == "preview" \
                else "an nn.Linear"
            raise ArgumentTypeError(f"head: expected {wanted}, got {type(head).__name__}")
        self.embed, self.head, self.source, self.depth = embed, head, source, depth

    def forward(self, slt: SingleLayerTransformer, x0: Tensor, t: float, y: Tensor | None,
                n_candidates: int) -> tuple[Tensor, Tensor]:
        if y is None:
            raise ArgumentError("y: the class-head scorer scores each condition's label; an "
                                "unconditional model takes the cosine or a callable scorer")
        if self.source == "preview":
            features = slt_preview(slt, x0, t, y.repeat_interleave(n_candidates))
            if self.embed is not None:  # (in the classifier's dtype: fp32 as fitted)
                features = self.embed(features.to(self.head.weight.dtype)).unsqueeze(1)
        else:
            features = null_label_features(slt, x0, t, self.depth)
        return ok.score_candidates(features, n_candidates, weight=self.head.weight,
                                   bias=self.head.bias, target=y)


class CosineScorer(nn.Module):
    """cos(pooled state after application `early`, pooled state after `late`), the SLT run
    under the candidate's own condition (or unconditioned). Label-free."""

    name = "cosine"

    def __init__(self, early: int | None = None, late: int = -1):
        super().__init__()
        self.early, self.late = early, late

    def forward(self, slt, x0, t, y, n_candidates):
        late = _check_depth(slt, self.late, "late")
        early = _check_depth(slt, self.early if self.early is not None
                             else slt.depth_steps // 2 - 1, "early")
        labels = None if slt.num_classes == 0 else y.repeat_interleave(n_candidates)
        _, (a, b) = slt.forward_with_states(x0, _time(x0, t), labels, keep=(early, late))
        return ok.score_candidates(a, n_candidates, other=b)


class CallableScorer(nn.Module):
    """A user's `fn(slt, x0, t, y_per_candidate) -> (M,)` scores, higher is better; picks by
    the same order as the kernel (ties to the lower index, NaN last)."""

    name = "callable"

    def __init__(self, fn: Callable):
        super().__init__()
        if not callable(fn):
            raise ArgumentTypeError(f"fn: expected a callable, got {type(fn).__name__}")
        self.fn = fn

    def forward(self, slt, x0, t, y, n_candidates):
        labels = None if y is None else y.repeat_interleave(n_candidates)
        scores = self.fn(slt, x0, t, labels)
        if not isinstance(scores, Tensor) or scores.shape != (x0.shape[0],):
            raise ArgumentError(f"scorer: a callable scorer must return ({x0.shape[0]},) "
                                f"scores, got {getattr(scores, 'shape', type(scores).__name__)}")
        scores = scores.float()
        return scores, top_k_reference(scores, n_candidates, 1)


# ---------------------------------------------------------------------------------------------
# Screening
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScreeningResult:
    samples: Tensor  # (B, ...) the teacher's samples from the picked noises
    noise: Tensor  # (B, ...) the picked noises
    picked: Tensor  # (B,) each condition's picked candidate, 0..N-1
    scores: Tensor  # (B, N) every candidate's score (float32)


def _conditions_per_chunk(slt, dtype, n_candidates, conditions, chunk_candidates,
                          memory_budget) -> int:
    if chunk_candidates is not None:
        if isinstance(chunk_candidates, bool) or not isinstance(chunk_candidates, int) \
                or chunk_candidates < 1:
            raise ArgumentError(f"chunk_candidates: expected a positive int, got "
                                f"{chunk_candidates!r}")
        per = chunk_candidates // n_candidates
    else:
        budget = memory_budget if memory_budget is not None else 2 << 30
        per = int(budget // (candidate_bytes(slt, dtype) * n_candidates))
    return max(1, min(conditions, per))


NOISE_ON = ("cpu", "device")


def draw_on_device(conditions: int, n_candidates: int, shape: tuple[int, ...], seed: int,
                   device: torch.device) -> Tensor:
    """`draw_candidates` from the device's own generator: no host work or copy (what a GPU's
    time budget wants), reproducible on that device, not across devices."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(conditions * n_candidates, *shape, generator=generator, device=device)


class Screener:
    """Screening with one SLT, scorer and teacher, kept across calls (on CUDA their graphs are
    captured once per shape and replayed): `screener(y, seed=...)` or, unconditional,
    `screener(None, conditions=B, seed=...)`. See `screen` for the arguments."""

    def __init__(self, slt: SingleLayerTransformer, slt_time: float, teacher: Callable,
                 scorer: nn.Module, n_candidates: int, *, shape: tuple[int, ...],
                 chunk_candidates: int | None = None, memory_budget: int | None = None,
                 cuda_graphs: bool = True, noise_on: str = "cpu"):
        if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) \
                or n_candidates < 1:
            raise ArgumentError(f"n_candidates: expected an int >= 1, got {n_candidates!r}")
        if noise_on not in NOISE_ON:
            raise ArgumentError(f"noise_on: expected one of {NOISE_ON}, got {noise_on!r}")
        param = next(slt.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.slt, self.slt_time, self.scorer = slt, slt_time, scorer
        self.n_candidates, self.shape, self.noise_on = n_candidates, tuple(shape), noise_on
        self.chunk_candidates, self.memory_budget = chunk_candidates, memory_budget
        _conditions_per_chunk(slt, self.dtype, n_candidates, 1, chunk_candidates, memory_budget)
        graphs = cuda_graphs and self.device.type == "cuda"
        self.score = CUDAGraphed(self._score, enabled=graphs)
        self.sample = CUDAGraphed(teacher, pool=self.score.pool if graphs else None,
                                  enabled=graphs)

    def _score(self, x0: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.scorer(self.slt, x0, self.slt_time, labels, self.n_candidates)

    def __call__(self, y: Tensor | None, *, conditions: int | None = None,
                 seed: int = 0) -> ScreeningResult:
        N = self.n_candidates
        if y is None:
            if conditions is None or conditions < 1:
                raise ArgumentError("conditions: an unconditional screening needs the number "
                                    "of samples (conditions=B)")
            B = conditions
        else:
            B = y.shape[0]
            y = y.to(self.device)
        if self.noise_on == "cpu":
            noise = draw_candidates(B, N, self.shape, seed).to(self.device, self.dtype)
        else:
            noise = draw_on_device(B, N, self.shape, seed, self.device).to(self.dtype)
        per = _conditions_per_chunk(self.slt, self.dtype, N, B, self.chunk_candidates,
                                    self.memory_budget)
        scores, picked = [], []
        with torch.no_grad():
            for start in range(0, B, per):
                stop = min(B, start + per)
                chunk_scores, best = self.score(noise[start * N:stop * N],
                                                None if y is None else y[start:stop])
                scores.append(chunk_scores.view(stop - start, N))
                picked.append(best[:, 0])
            scores, picked = torch.cat(scores), torch.cat(picked)
            x0 = noise[torch.arange(B, device=picked.device) * N + picked]
            samples = self.sample(x0, y)
        return ScreeningResult(samples, x0, picked, scores.float())


def screen(slt: SingleLayerTransformer, slt_time: float, teacher: Callable,
           y: Tensor | None, n_candidates: int, scorer: nn.Module, *,
           shape: tuple[int, ...], conditions: int | None = None, seed: int = 0,
           chunk_candidates: int | None = None, memory_budget: int | None = None,
           cuda_graphs: bool = True, noise_on: str = "cpu") -> ScreeningResult:
    """Screen N = `n_candidates` noises per condition with `slt` and `scorer`, and sample the
    teacher once per condition from the best (see the module docstring).

    slt, slt_time: the candidate model and the time it runs at (its teacher's).
    teacher: the one-step sampler, (x0, y) -> x1.
    y: (B,) labels, or None with `conditions` = B for unconditional models.
    shape: one noise's shape (C, H, W). seed: the candidates' seed.
    chunk_candidates / memory_budget: the SLT's batch, in candidates (rounded down to whole
        conditions) or in bytes of activations (default 2 GiB); at least one condition.
    cuda_graphs: on CUDA, replay the scoring and the teacher from CUDA graphs.
    noise_on: "cpu" (the same candidates on every device) or "device" (drawn by the device's
        generator: no host work; reproducible on that device only).
    """
    screener = Screener(slt, slt_time, teacher, scorer, n_candidates, shape=shape,
                        chunk_candidates=chunk_candidates, memory_budget=memory_budget,
                        cuda_graphs=cuda_graphs, noise_on=noise_on)
    return screener(y, conditions=conditions, seed=seed)


# ---------------------------------------------------------------------------------------------
# The class head: its labeler and its training stage
# ---------------------------------------------------------------------------------------------


def _shifted(images: Tensor, generator: torch.Generator) -> Tensor:
    """The batch moved by up to one pixel each way (edges replicated): the augmentation that
    keeps a pixel classifier from keying on exact positions."""
    if images.dim() != 4:
        return images
    dy, dx = torch.randint(3, (2,), generator=generator).tolist()
    padded = nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    return padded[:, :, dy:dy + images.shape[2], dx:dx + images.shape[3]]


def _train_classifier(model: PreviewClassifier, inputs: Tensor, targets: Tensor, *,
                      steps: int, batch: int, lr: float, seed: int, shift: bool) -> None:
    """AdamW on the cross-entropy with `targets`: (n,) labels or (n, C) probabilities."""
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(inputs), (batch,), generator=generator)
        x = _shifted(inputs[index], generator) if shift else inputs[index]
        logp = model(x).log_softmax(-1)
        target = targets[index]
        loss = (nn.functional.nll_loss(logp, target) if target.dim() == 1
                else -(target * logp).sum(-1).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def fit_preview_classifier(images: Tensor, labels: Tensor, *, hidden: int = 256,
                           steps: int = 3000, batch: int = 128, lr: float = 2e-3,
                           seed: int = 0) -> PreviewClassifier:
    """A `PreviewClassifier` trained on the teacher's real training images (fp32, one-pixel
    shifts as augmentation) on all but a held-out tenth, whose accuracy it keeps
    (`.accuracy`): the labeler of the teacher's samples, and the start of the preview
    scorer. Deliberately not the evaluation classifier (a CNN): another model, so that what
    the scorers learn is not the judge's view. Seconds on the digits."""
    labels = torch.as_tensor(labels)
    classes = int(labels.max()) + 1 if len(labels) else 0
    if len(images) != len(labels) or len(images) < 10:
        raise ArgumentError(f"images: expected at least 10 images with one label each, got "
                            f"{len(images)} images and {len(labels)} labels")
    if labels.min() < 0 or set(labels.unique().tolist()) != set(range(classes)):
        raise ArgumentError(f"labels: expected classes 0..C-1, got {labels.unique().tolist()}")
    images = images.float()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(int(seed)))
    held, fit = order[: len(images) // 10], order[len(images) // 10:]
    torch.manual_seed(int(seed))
    model = PreviewClassifier(images[0].numel(), classes, hidden)
    _train_classifier(model, images[fit], labels[fit], steps=steps, batch=batch, lr=lr,
                      seed=seed, shift=True)
    with torch.no_grad():
        model.accuracy = (model(images[held]).argmax(1) == labels[held]).float().mean().item()
    return model


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return float(value) if np.isfinite(value) else 0.0


@dataclasses.dataclass
class HeadReport:
    samples: int
    labeler_accuracy: float  # the labeler on held-out real images
    head_agreement: float  # the head's argmax against the labeler's, held-out noise
    spearman: float  # head score vs the labeler's log p(y | teacher sample), held out


def _labelled_noise(features: Callable, teacher: Callable, labeler: Callable,
                    num_classes: int, shape: tuple[int, ...], slt: SingleLayerTransformer,
                    samples: int, batch: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """`samples` noises x0 with random labels y (one generator seeded with `seed`), in
    batches on the SLT's device and dtype: (features(x0, y), the labeler's class
    probabilities of the teacher's samples teacher(x0, y), y), on the CPU in fp32."""
    if num_classes < 1:
        raise ArgumentError(f"num_classes: the class head needs labels, got {num_classes}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 5:
        raise ArgumentError(f"samples: expected an int >= 5, got {samples!r}")
    generator = torch.Generator().manual_seed(int(seed))
    param = next(slt.parameters())
    x0_all = torch.randn(samples, *shape, generator=generator)
    y_all = torch.randint(0, num_classes, (samples,), generator=generator)
    out, targets = [], []
    with torch.no_grad():
        for start in range(0, samples, batch):
            x0 = x0_all[start:start + batch].to(param.device, param.dtype)
            y = y_all[start:start + batch].to(param.device)
            targets.append(labeler(teacher(x0, y)).float().cpu())
            out.append(features(x0, y).float().cpu())
    return torch.cat(out), torch.cat(targets), y_all


def train_class_head(slt: SingleLayerTransformer, slt_time: float, teacher: Callable,
                     labeler: Callable, num_classes: int, *, shape: tuple[int, ...],
                     depth: int = -1, samples: int = 4096, batch: int = 512, seed: int = 0,
                     weight_decay: float = 1e-3) -> tuple[nn.Linear, HeadReport]:
    """Fit the class head of `ClassHeadScorer`: on `samples` noises x0 with random labels y,
    the teacher's samples x1 = teacher(x0, y) are labelled by `labeler` (class probabilities,
    soft), and a multinomial logistic regression (L-BFGS, full batch, on standardised
    features, `weight_decay` on the weights) learns them from the SLT's pooled null-label
    features of x0. It cannot read y (the features never saw it), so it learns which classes
    this noise leads to, by the teacher's and the labeler's account. A fifth of the samples is
    held out for the report: the head's agreement with the labeler and the Spearman
    correlation of its score log p_head(y | x0) with the labeler's log p(y | x1)."""
    device = next(slt.parameters()).device
    features, targets, y_all = _labelled_noise(
        lambda x0, y: null_label_features(slt, x0, slt_time, depth).float().mean(1),
        teacher, labeler, num_classes, shape, slt, samples, batch, seed)
    features, targets = features.double(), targets.double()
    held = samples // 5
    fit_x, fit_q = features[held:], targets[held:]
    mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-6)
    z = (fit_x - mean) / std
    linear = nn.Linear(z.shape[1], num_classes, dtype=torch.float64)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logp = linear(z).log_softmax(-1)
        loss = -(fit_q * logp).sum(-1).mean() + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    head = nn.Linear(z.shape[1], num_classes)
    with torch.no_grad():  # fold the standardisation into the weights
        weight = linear.weight / std
        head.weight.copy_(weight)
        head.bias.copy_(linear.bias - weight @ mean)
        logp = torch.nn.functional.linear(features[:held], weight, head.bias.double())
        logp = logp.log_softmax(-1)
        ours = logp.gather(1, y_all[:held, None])[:, 0]
        theirs = targets[:held].gather(1, y_all[:held, None])[:, 0].clamp_min(1e-12).log()
        agreement = (logp.argmax(1) == targets[:held].argmax(1)).double().mean().item()
    report = HeadReport(samples, float(getattr(labeler, "accuracy", float("nan"))), agreement,
                        _spearman(ours.numpy(), theirs.numpy()))
    return head.to(device), report


def distill_preview_classifier(classifier: PreviewClassifier, slt: SingleLayerTransformer,
                               slt_time: float, teacher: Callable, num_classes: int, *,
                               shape: tuple[int, ...], samples: int = 100_000,
                               steps: int = 10_000, batch: int = 256, lr: float = 1e-3,
                               seed: int = 0) -> tuple[PreviewClassifier, HeadReport]:
    """The preview scorer's classifier: `classifier` (fitted on real images) adapted to this
    SLT's previews. On `samples` noises x0 with random labels y, the teacher's samples
    x1 = teacher(x0, y) are labelled by `classifier` itself (class probabilities), and a copy
    of it learns those from the SLT's preview of x0 under y (AdamW, cross-entropy with the
    soft labels): it learns what the preview's errors say about the teacher's sample. (On the
    digits this adds about 0.05 to the within-class Spearman correlation with the judge;
    benchmarks/results/digits-cpu.md.) It could in principle learn to read y back from the
    preview and score every candidate alike; the report's held-out Spearman correlation of
    its log p(y | preview) with the labeler's log p(y | x1) says whether it ranks instead.
    A fifth of the samples is held out for the report."""
    previews, targets, y_all = _labelled_noise(
        lambda x0, y: slt_preview(slt, x0, slt_time, y)[:, 0], teacher,
        classifier.probabilities, num_classes, shape, slt, samples, 4096, seed)
    device = next(slt.parameters()).device
    student = copy.deepcopy(classifier).cpu().float()
    held = samples // 5
    _train_classifier(student, previews[held:], targets[held:], steps=steps, batch=batch,
                      lr=lr, seed=seed + 1, shift=False)
    with torch.no_grad():
        logp = student(previews[:held]).log_softmax(-1)
        ours = logp.gather(1, y_all[:held, None])[:, 0]
        theirs = targets[:held].gather(1, y_all[:held, None])[:, 0].clamp_min(1e-12).log()
        agreement = (logp.argmax(1) == targets[:held].argmax(1)).double().mean().item()
    report = HeadReport(samples, float(getattr(classifier, "accuracy", float("nan"))),
                        agreement, _spearman(ours.numpy(), theirs.numpy()))
    return student.to(device), report


def save_head(path: Path, head: nn.Linear | PreviewClassifier, meta: dict) -> None:
    """A class head (an nn.Linear) or a `PreviewClassifier`, fp32, and its description (the
    SLT checkpoint and its teacher's digest, the training report), written to a temporary
    file and renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {name: value.detach().float().cpu().contiguous()
               for name, value in head.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"onestep": json.dumps(meta)})
    tmp.replace(path)


def load_head(path: Path) -> tuple[nn.Linear | PreviewClassifier, dict]:
    """What `save_head` wrote: (the head or classifier, its description)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["onestep"])
    tensors = load_file(str(path))
    if "embed.1.weight" in tensors:
        hidden, features = tensors["embed.1.weight"].shape
        head = PreviewClassifier(features, tensors["head.weight"].shape[0], hidden)
    else:
        head = nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
    head.load_state_dict(tensors)
    return head.eval(), meta


def _block_flops(tokens: int, width: int, hidden: int) -> int:
    """FLOPs (2 per multiply-add) of one DiT block on one sample: its products (qkv and the
    projection 4 D^2, the MLP 2 D F per token) and attention (2 T^2 D: scores and values)."""
    return 2 * (tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width)


def screening_flops(slt: SingleLayerTransformer, n_candidates: int) -> float:
    """Analytic FLOPs of one SLT forward over `n_candidates` candidates: K applications of its
    block, the K modulations' product (6 D^2 each), the patch embedding and the head. (torch's
    FLOP counter sees no attention, and count_macs no custom op.)"""
    block = slt.block
    T, D = slt.x_embedder.num_patches, block.hidden_size
    K = slt.depth_steps
    patch = slt.patch_size ** 2 * slt.in_channels
    per_candidate = (K * _block_flops(T, D, block.mlp.fc1.out_features)
                     + 2 * (2 * T * patch * D + K * 6 * D * D))
    return float(n_candidates * per_candidate)


def dit_flops(dit: nn.Module, batch: int = 1) -> float:
    """Analytic FLOPs of one DiT forward (a teacher sample) at `batch`: L blocks, their
    modulations, the patch embedding and the final layer, counted as `screening_flops` does."""
    blocks = dit.blocks
    T, D = dit.x_embedder.num_patches, blocks[0].hidden_size
    patch = dit.patch_size ** 2 * dit.in_channels
    out = dit.final_layer.linear.out_features
    per_sample = (len(blocks) * (_block_flops(T, D, blocks[0].mlp.fc1.out_features)
                                 + 2 * 6 * D * D)
                  + 2 * (T * patch * D + T * D * out + 2 * D * D))
    return float(batch * per_sample)


__all__ = ["CallableScorer", "ClassHeadScorer", "CosineScorer", "HeadReport",
           "PreviewClassifier", "Screener", "ScreeningResult", "candidate_bytes",
           "distill_preview_classifier", "dit_flops", "draw_candidates", "draw_on_device",
           "fit_preview_classifier", "load_head", "null_label_features", "save_head", "screen",
           "screening_flops", "slt_preview", "train_class_head"]
