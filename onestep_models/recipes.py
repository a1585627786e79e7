"""A run, assembled from its JSON-able config: the dataset, the networks and the recipe; and
the same run loaded back from a checkpoint for sampling and evaluation.

    {"recipe": "direct" | "flow",
     "data": {"kind": "digits", "size": 8}
           | {"kind": "folder", "path": ..., "size": ..., "channels": 3, "vae": null, "cache": ...},
     "model": {keyword arguments of onestep_models.dit.FlowDiT},
     "options": {DirectConfig fields, or FlowMatching's class_dropout}}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import TensorDataset

from onestep_models import data as datasets
from onestep_models.direct import DirectConfig, DirectModel
from onestep_models.dit import FlowDiT
from onestep_models.flow import FlowMatching

RECIPES = ("flow", "direct")

# Network sizes for FlowDiT (patch size, width, depth, heads); DiT-S/B/L/XL for real data.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(patch_size=2, hidden_size=64, depth=4, num_heads=4),
    "small": dict(patch_size=2, hidden_size=128, depth=6, num_heads=4),
    "DiT-S/2": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),
    "DiT-B/2": dict(patch_size=2, hidden_size=768, depth=12, num_heads=12),
    "DiT-L/2": dict(patch_size=2, hidden_size=1024, depth=24, num_heads=16),
    "DiT-XL/2": dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}


def load_data(spec: dict[str, Any]) -> tuple[TensorDataset, int]:
    """(dataset, number of classes) for a run's "data" entry."""
    kind = spec.get("kind")
    if kind == "digits":
        return datasets.digits(spec.get("size", 8)), datasets.DIGITS_CLASSES
    if kind == "folder":
        images, classes = datasets.image_folder(spec["path"], spec["size"],
                                                spec.get("channels", 3))
        if spec.get("vae"):
            default = Path(spec["path"]) / f"latents_{spec['size']}.safetensors"
            cache = spec.get("cache") or str(default)
            images = datasets.vae_latents(images, spec["vae"], cache)
        return images, len(classes)
    raise ValueError(f"data: unknown kind {kind!r} (expected 'digits' or 'folder')")


def model_kwargs(size: str, sample_shape: tuple[int, ...], num_classes: int,
                 fused: bool = True) -> dict[str, Any]:
    """FlowDiT arguments for a named size on data of shape (C, H, W)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model: unknown size {size!r} (expected one of {', '.join(MODEL_SIZES)})")
    channels, height, width = sample_shape
    if height != width:
        raise ValueError(f"data: DiT needs square inputs, got {height}x{width}")
    return dict(input_size=height, in_channels=channels, num_classes=num_classes,
                class_dropout_prob=0.1 if num_classes else 0.0, fused=fused, **MODEL_SIZES[size])


def build(config: dict[str, Any]) -> nn.Module:
    """The recipe module (networks freshly initialised) for a run config."""
    recipe, model, options = config["recipe"], config["model"], dict(config.get("options", {}))
    num_classes = model.get("num_classes", 0)
    if recipe == "flow":
        return FlowMatching(FlowDiT(**model), num_classes, **options)
    if recipe == "direct":
        return DirectModel(FlowDiT(**model), FlowDiT(**model), DirectConfig(**options),
                           num_classes)
    raise ValueError(f"recipe: unknown {recipe!r} (expected one of {RECIPES})")


def default_options(recipe: str) -> dict[str, Any]:
    if recipe == "direct":
        return dataclasses.asdict(DirectConfig())
    if recipe == "flow":
        return {"class_dropout": 0.1}
    raise ValueError(f"recipe: unknown {recipe!r} (expected one of {RECIPES})")
