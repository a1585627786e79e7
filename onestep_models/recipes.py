"""A run, assembled from its JSON-able config: the dataset, the networks and the recipe; and
the same run loaded back from a checkpoint for sampling and evaluation.

The run configuration has one schema, from the command line (`run_config`) through the
trainer to every checkpoint's state.json and back (`build`):

    {"recipe": "direct" | "flow" | "slimflow_reflow" | "slimflow_distill" | "slt",
     "data": {"kind": "digits", "size": 8}
           | {"kind": "folder", "path": ..., "size": ..., "channels": 3, "vae": null, "cache": ...}
           | {"kind": "pairs", "path": ...} (onestep_models.slimflow's teacher pairs)
           | {"kind": "noise", "shape": [C, H, W], "num_classes": K, "size": N,
              "teacher_data": {the teacher's data}} (data-free distillation: labels only,
              the noise drawn per step),
     "model": {keyword arguments of onestep_models.dit.FlowDiT, or for "slt" of
               onestep_models.slt.SingleLayerTransformer},
     "options": {DirectConfig fields, FlowMatching's class_dropout, the SlimFlow stage's, or
                 the SLT distillation's with its "teacher": {"checkpoint", "digest",
                 "recipe"}}}

(the trainer adds "train": its TrainConfig). Named sizes (`MODEL_SIZES`) expand into "model"
once, where the config is made, from the data's shape and classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from onestep_kernels.errors import ArgumentError
from onestep_models import data as datasets
from onestep_models.data_record import RecordedDataset
from onestep_models.direct import DirectConfig, DirectModel
from onestep_models.dit import DIT_SIZES, FlowDiT
from onestep_models.flow import FlowMatching
from onestep_models.slt import (
    SLT_SIZES,
    SingleLayerTransformer,
    SLTDistillation,
    default_depth_steps,
    default_fusion_states,
)

RECIPES = ("flow", "direct", "slimflow_reflow", "slimflow_distill", "slt")

# Network sizes for FlowDiT (patch size, width, depth, heads): two small ones for the embedded
# digits, and DiT-S/B/L/XL with patch 2 (onestep_models.dit's sizes) for real data.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"patch_size": 2, "hidden_size": 64, "depth": 4, "num_heads": 4},
    "small": {"patch_size": 2, "hidden_size": 128, "depth": 6, "num_heads": 4},
    # SlimFlow students of the "tiny" teacher: 21% and 12% of its parameters
    "slim-32": {"patch_size": 2, "hidden_size": 32, "depth": 3, "num_heads": 2},
    "slim-24": {"patch_size": 2, "hidden_size": 24, "depth": 3, "num_heads": 2},
    # a deep one-step teacher for the SLT's layer-number distillation on digits
    "deep": {"patch_size": 2, "hidden_size": 64, "depth": 8, "num_heads": 4},
    **{f"DiT-{name}/2": {"patch_size": 2, "hidden_size": width, "depth": depth,
                         "num_heads": heads}
       for name, (depth, width, heads) in DIT_SIZES.items()},
}


def load_data(spec: dict[str, Any]) -> tuple[RecordedDataset, int]:
    """(dataset, number of classes) for a run's "data" entry; the dataset carries the
    fingerprint of the data (onestep_models.data_record), which the trainer records."""
    kind = spec.get("kind")
    if kind == "pairs":
        from onestep_models.slimflow import load_pairs, pairs_fingerprint

        pairs, manifest = load_pairs(spec["path"])
        return (RecordedDataset(*pairs.tensors, fingerprint=pairs_fingerprint(spec["path"])),
                manifest["num_classes"])
    if kind == "digits":
        return datasets.digits(spec.get("size", 8)), datasets.DIGITS_CLASSES
    if kind == "noise":
        return noise_labels(spec), spec["num_classes"]
    if kind == "folder":
        images, classes = datasets.image_folder(spec["path"], spec["size"],
                                                spec.get("channels", 3),
                                                skip_bad=spec.get("skip_bad_images", False),
                                                name="--data")
        if spec.get("vae"):
            default = Path(spec["path"]) / f"latents_{spec['size']}.safetensors"
            cache = spec.get("cache") or str(default)
            images = datasets.vae_latents(images, spec["vae"], cache)
        return images, len(classes)
    raise ArgumentError(f"data: unknown kind {kind!r} (expected 'digits', 'folder', 'pairs' or "
                        "'noise')")


def noise_labels(spec: dict[str, Any]) -> RecordedDataset:
    """The data-free "dataset": `size` rows of balanced labels (0, 1, ..., K-1, 0, ...) beside a
    zero sample of the data's shape that no recipe reads (the noise is drawn per step from the
    run's seeded generators); no memory per row (the zero sample is a broadcast view)."""
    shape, size, classes = tuple(spec["shape"]), spec["size"], spec["num_classes"]
    samples = torch.zeros(1, *shape).expand(size, *shape)
    labels = torch.arange(size) % classes if classes else torch.zeros(size, dtype=torch.long)
    fingerprint = {"kind": "noise", "settings": dict(spec), "files": {}}
    return RecordedDataset(samples, labels, fingerprint=fingerprint)


def real_data(spec: dict[str, Any]) -> dict[str, Any]:
    """The data a run's samples are compared with: its own, or for teacher pairs the data the
    teacher was trained on (recorded in the pairs' manifest)."""
    if spec.get("kind") == "noise":
        return spec["teacher_data"]
    if spec.get("kind") != "pairs":
        return spec
    import json

    manifest = json.loads((Path(spec["path"]) / "pairs.json").read_text())
    teacher_data = manifest.get("teacher", {}).get("data")
    if teacher_data is None:
        raise ArgumentError(f"data: the pairs in {spec['path']} do not record their teacher's data")
    return teacher_data


def model_kwargs(size: str, sample_shape: tuple[int, ...], num_classes: int,
                 fused: bool = True) -> dict[str, Any]:
    """FlowDiT arguments for a named size on data of shape (C, H, W)."""
    if size not in MODEL_SIZES:
        raise ArgumentError(f"model: unknown size {size!r} (expected one of "
                            f"{', '.join(MODEL_SIZES)})")
    channels, height, width = sample_shape
    if height != width:
        raise ArgumentError(f"data: DiT needs square inputs, got {height}x{width}")
    patch = MODEL_SIZES[size]["patch_size"]
    if height % patch:
        raise ArgumentError(f"data: samples of side {height} do not split into model {size}'s "
                            f"{patch}x{patch} patches (pick a --size whose samples do)")
    return dict(input_size=height, in_channels=channels, num_classes=num_classes,
                class_dropout_prob=0.1 if num_classes else 0.0, fused=fused, **MODEL_SIZES[size])


def build(config: dict[str, Any], training: bool = True) -> nn.Module:
    """The recipe module (networks freshly initialised) for a run config; `training=False`
    builds it for sampling, without what only its loss needs (LPIPS' weight files)."""
    recipe, model, options = config["recipe"], config["model"], dict(config.get("options", {}))
    num_classes = model.get("num_classes", 0)
    if recipe == "flow":
        return FlowMatching(FlowDiT(**model), num_classes, **options)
    if recipe == "direct":
        return DirectModel(FlowDiT(**model), FlowDiT(**model), DirectConfig(**options),
                           num_classes)
    if recipe == "slimflow_reflow":
        from onestep_models.slimflow import AnnealingReflow

        return AnnealingReflow(FlowDiT(**model), num_classes, **options)
    if recipe == "slimflow_distill":
        from onestep_models.slimflow import FlowGuidedDistillation

        options.pop("init", None)  # where the weights started: stage 1's checkpoint
        weights = options.pop("lpips_weights", None)
        if options.get("distance") == "lpips" and not training:
            options["distance"] = "pseudo_huber"  # (the samplers never call the distance)
        elif options.get("distance") == "lpips":
            from onestep_models.lpips import LPIPS

            if not weights:
                raise ArgumentError("options: distance 'lpips' needs lpips_weights "
                                    "{'vgg': ..., 'lins': ...} (local files)")
            options["distance"] = LPIPS.from_files(weights["vgg"], weights["lins"])
        return FlowGuidedDistillation(FlowDiT(**model), FlowDiT(**model), num_classes,
                                      **options)
    if recipe == "slt":
        recorded, teacher = options.pop("teacher"), None
        if training:
            teacher, _ = load_one_step_teacher(Path(recorded["checkpoint"]),
                                               expected_digest=recorded["digest"])
        return SLTDistillation(SingleLayerTransformer(**model), teacher,
                               num_classes=num_classes, **options)
    raise ArgumentError(f"recipe: unknown {recipe!r} (expected one of {RECIPES})")


def _teacher_checkpoint(ckpt: Path):
    """The newest intact checkpoint of a teacher run; a SlimFlow run's top folder (its stages
    in distill/ and reflow/) stands for its last stage that has one."""
    from onestep_models.run_dir import latest_checkpoint

    checkpoint = latest_checkpoint(ckpt)
    for stage in ("distill", "reflow"):
        if checkpoint is None and (Path(ckpt) / stage).is_dir():
            checkpoint = latest_checkpoint(Path(ckpt) / stage)
    if checkpoint is None:
        raise FileNotFoundError(f"--teacher: no checkpoint under {ckpt}")
    return checkpoint


def load_teacher(ckpt: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict, Path]:
    """(the velocity network with its EMA weights, its run config, the checkpoint) of a
    trained flow-based run (flow, direct or a SlimFlow stage), frozen: what a distillation
    recipe takes as its teacher. CheckpointError or ValueError naming what does not fit."""
    from onestep_models.run_dir import load_weights, read_checkpoint_state

    checkpoint = _teacher_checkpoint(ckpt)
    run = read_checkpoint_state(checkpoint)["config"]
    recipe = build(run, training=False)
    load_weights(recipe, checkpoint, "ema")
    if not isinstance(getattr(recipe, "v", None), nn.Module):
        raise ArgumentError(f"--teacher: {checkpoint} is a {run['recipe']!r} run without a "
                            "velocity network v")
    return recipe.v.to(device).eval().requires_grad_(False), run, checkpoint


# The one-step map of each recipe that has one: (the network, the time it is evaluated at):
# x1 = x0 + f(x0, t, y). A Direct Model's w at t = 1 (phi(x0, 1) = x0 + 1 * w), a SlimFlow
# student's v at its smallest time (slimflow.one_step).
def _one_step_network(recipe: str, module: nn.Module) -> tuple[nn.Module, float] | None:
    if recipe == "direct":
        return module.w, 1.0
    if recipe in ("slimflow_reflow", "slimflow_distill"):
        from onestep_models.slimflow import EPS

        return module.v, EPS
    return None


def load_one_step_teacher(ckpt: Path, device: torch.device | str = "cpu",
                          expected_digest: str | None = None
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """(the one-step map's network with its EMA weights, frozen; its description: the run
    config, the checkpoint, the time the network is evaluated at, and the digest of its
    weights) of a trained one-step run (Direct Models, or a SlimFlow stage): what a
    layer-number distillation takes as its teacher. A flow run is no one-step map, and is
    refused by name; so is a checkpoint whose weights are not the `expected_digest` ones."""
    from onestep_models.run_dir import load_weights, read_checkpoint_state

    checkpoint = _teacher_checkpoint(ckpt)
    state = read_checkpoint_state(checkpoint)
    run = state["config"]
    digest = state.get("files", {}).get("ema.safetensors", {}).get("sha256")
    if expected_digest is not None and digest != expected_digest:
        from onestep_kernels.errors import DataError

        raise DataError(f"--teacher: {checkpoint}'s weights are not the ones this run was "
                        f"distilled from (sha256 {digest} against {expected_digest})")
    module = build(run, training=False)
    found = _one_step_network(run["recipe"], module)
    if found is None:
        raise ArgumentError(f"--teacher: {checkpoint} is a {run['recipe']!r} run, not a "
                            "one-step map (a flow needs many steps): distil a Direct Models "
                            "or SlimFlow run")
    load_weights(module, checkpoint, "ema")
    network, time = found
    network = network.to(device).eval().requires_grad_(False)
    return network, {"run": run, "checkpoint": str(Path(checkpoint).resolve()), "time": time,
                     "digest": digest}


def slt_run_config(teacher_ckpt: Path, size: str, fused: bool, options: dict[str, Any],
                   depth_steps: int | None = None, patch_size: int | None = None,
                   fusion: bool = True, data_size: int = 10_000
                   ) -> tuple[dict[str, Any], TensorDataset, int]:
    """(the run config, the data-free dataset, the number of classes) of an SLT distilled from
    the one-step run `teacher_ckpt`: the named SLT size (`SLT_SIZES`) at the teacher's data
    shape and classes, K = the teacher's depth (a quarter of it for the screening sizes,
    `slt.DEPTH_FRACTION`) unless `depth_steps` is given, the P feature patches
    (`options["patches"]`, default 4, or K where K < 4) fused by its head (`fusion`; else its
    last state alone); the teacher recorded by checkpoint and digest."""
    if size not in SLT_SIZES:
        raise ArgumentError(f"model: unknown SLT size {size!r} (expected one of "
                            f"{', '.join(SLT_SIZES)})")
    _, teacher = load_one_step_teacher(teacher_ckpt)
    teacher_model = teacher["run"]["model"]
    options = {"patches": None, **options}
    model = dict(SLT_SIZES[size], input_size=teacher_model["input_size"],
                 in_channels=teacher_model["in_channels"],
                 num_classes=teacher_model.get("num_classes", 0),
                 class_dropout_prob=0.1 if teacher_model.get("num_classes", 0) else 0.0,
                 fused=fused)
    model["depth_steps"] = depth_steps or default_depth_steps(size, teacher_model["depth"])
    if options["patches"] is None:
        options["patches"] = default_fusion_states(model["depth_steps"])
    if patch_size is not None:
        model["patch_size"] = patch_size
    model["fusion_states"] = options["patches"] if fusion else 1
    num_classes = model["num_classes"]
    data = {"kind": "noise", "shape": [teacher_model["in_channels"], teacher_model["input_size"],
                                       teacher_model["input_size"]],
            "num_classes": num_classes, "size": data_size,
            "teacher_data": real_data(teacher["run"]["data"])}
    options.update(teacher_time=teacher["time"], teacher_width=teacher_model["hidden_size"],
                   teacher_patch=teacher_model["patch_size"], teacher_depth=teacher_model["depth"],
                   teacher={"checkpoint": teacher["checkpoint"], "digest": teacher["digest"],
                            "recipe": teacher["run"]["recipe"]})
    return ({"recipe": "slt", "data": data, "model": model, "options": options},
            noise_labels(data), num_classes)


def default_options(recipe: str) -> dict[str, Any]:
    if recipe == "direct":
        return dataclasses.asdict(DirectConfig())
    if recipe == "flow":
        return {"class_dropout": 0.1}
    if recipe == "slimflow_reflow":
        return {"anneal_steps": 1000, "schedule": "linear", "hflip": False}
    if recipe == "slimflow_distill":
        return {"distance": "pseudo_huber", "guidance": True}
    if recipe == "slt":
        return {"output_weight": 1.0, "feature_weight": 1.0, "class_dropout": 0.1,
                "patches": None}
    raise ArgumentError(f"recipe: unknown {recipe!r} (expected one of {RECIPES})")


def run_config(recipe: str, data: dict[str, Any], size: str, fused: bool,
               options: dict[str, Any]) -> tuple[dict[str, Any], TensorDataset, int]:
    """(the run config, the dataset, its number of classes): the named size expanded into
    FlowDiT arguments for the data's shape, in the schema of the module docstring."""
    if recipe not in RECIPES:
        raise ArgumentError(f"recipe: unknown {recipe!r} (expected one of {RECIPES})")
    dataset, num_classes = load_data(data)
    model = model_kwargs(size, tuple(dataset[0][0].shape), num_classes, fused)
    return ({"recipe": recipe, "data": data, "model": model, "options": dict(options)},
            dataset, num_classes)
