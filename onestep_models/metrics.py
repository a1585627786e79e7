"""Sample-quality metrics.

- digits-FD: the Fréchet distance between real and generated images in the 128-dimensional
  penultimate features of a small CNN trained on scikit-learn's digits (the FID recipe with a
  feature extractor that fits the data). The classifier's weights ship with the package
  (`assets/digits_classifier.safetensors`) and are made reproducibly by
  `python -m onestep_models.metrics --out onestep_models/assets/digits_classifier.safetensors`.
- class accuracy: how often that classifier names the class a sample was conditioned on.
- FID: the same distance in Inception-v3 pool features (`onestep_models.inception`).
- straightness: how far a sampler's trajectory is from a straight line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestep_kernels.errors import ArgumentError
from onestep_models import flow

CLASSIFIER_WEIGHTS = Path(__file__).with_name("assets") / "digits_classifier.safetensors"


class DigitsClassifier(nn.Module):
    """A small CNN on 8x8 grey digits in [-1, 1]; other sizes are resized to 8x8 first."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, 10)

    def embed(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ArgumentError(f"x: expected grey images (B, 1, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def train_classifier(steps: int = 3000, seed: int = 0, holdout: int = 297
                     ) -> tuple[DigitsClassifier, float]:
    """Train on all digits but the last `holdout` (one-pixel random shifts as augmentation);
    returns the model and its accuracy on the held-out images. Deterministic for a seed on
    one machine (fp32, CPU)."""
    from onestep_models.data import digits

    torch.manual_seed(seed)
    images, labels = digits().tensors
    train_x, train_y = images[:-holdout], labels[:-holdout]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(train_x), (128,), generator=g)
        x = F.pad(train_x[idx], (1, 1, 1, 1), value=-1.0)
        dy, dx = torch.randint(3, (2,), generator=g).tolist()
        x = x[:, :, dy:dy + 8, dx:dx + 8]
        loss = F.cross_entropy(model(x), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[-holdout:]).argmax(1) == labels[-holdout:]).float().mean()
    return model, accuracy.item()


def load_classifier(path: str | Path = CLASSIFIER_WEIGHTS) -> DigitsClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path} (make them with "
                                f"`python -m onestep_models.metrics --out {path}`)")
    model = DigitsClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


@torch.no_grad()
def features(extractor: nn.Module, images: Tensor, batch_size: int = 500) -> np.ndarray:
    """extractor.embed over batches → float64 (N, D) features."""
    out = [extractor.embed(images[i:i + batch_size].float()).double()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).cpu().numpy()


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits."""
    from scipy import linalg

    for name, f in (("feat_a", feat_a), ("feat_b", feat_b)):
        if f.ndim != 2 or len(f) < 2:
            raise ArgumentError(f"{name}: expected (N >= 2, D) features, got shape {f.shape}")
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    cov_a, cov_b = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularise, as pytorch-fid does
        eps = 1e-6 * np.eye(len(cov_a))
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def digits_fd(samples: Tensor, real: Tensor, classifier: DigitsClassifier | None = None) -> float:
    classifier = classifier or load_classifier()
    return frechet_distance(features(classifier, samples), features(classifier, real))


@torch.no_grad()
def class_accuracy(samples: Tensor, labels: Tensor,
                   classifier: DigitsClassifier | None = None) -> float:
    """The fraction of samples the classifier assigns to the class they were generated for."""
    if labels.shape != (len(samples),):
        raise ArgumentError(f"labels: expected ({len(samples)},), got {tuple(labels.shape)}")
    classifier = classifier or load_classifier()
    pred = torch.cat([classifier(samples[i:i + 500].float()).argmax(1)
                      for i in range(0, len(samples), 500)])
    return (pred.cpu() == labels.cpu()).float().mean().item()


@torch.no_grad()
def straightness(v: flow.Velocity, x0: Tensor, steps: int, y: Tensor | None = None) -> float:
    """Mean over the Euler trajectory of ||(x1 - x0) - v(x_t, t)||^2 per element (0 for a
    straight path), as in the rectified-flow paper."""
    times = flow._times(steps, 0.0, 1.0)
    x, velocities = x0, []
    for a, b in zip(times[:-1], times[1:]):
        velocities.append(v(x, flow._t(x, a), y))
        x = x + (b - a) * velocities[-1]
    chord = x - x0
    return torch.stack([(chord - u).square().mean() for u in velocities]).mean().item()


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="Train the digits-FD classifier.")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_WEIGHTS)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same arithmetic order on every machine
    model, accuracy = train_classifier(args.steps, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out),
              metadata={"heldout_accuracy": f"{accuracy:.4f}", "steps": str(args.steps),
                        "seed": str(args.seed)})
    print(f"held-out accuracy {accuracy:.4f}; weights written to {args.out}")


if __name__ == "__main__":
    main()
