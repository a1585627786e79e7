"""Evaluation of a trained run: every sampler of the run on the same noise and labels, judged
alike (digits-FD and class accuracy on digits, FID with local Inception weights, the
straightness of a flow's path), as a table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from onestep_kernels.errors import ArgumentError
from onestep_models import recipes
from onestep_models.runs import load_run, to_images
from onestep_models.train import grid_inputs


def evaluate(ckpt: Path, num: int, seed: int, device: torch.device,
             inception: Path | None = None, extra_samplers: dict | None = None
             ) -> dict[str, Any]:
    """Every sampler of the run (and `extra_samplers`, (x0, y) -> samples, such as a screened
    one) on the same noise and labels, judged alike."""
    from onestep_models import metrics

    model, run, checkpoint = load_run(ckpt, device)
    data = recipes.real_data(run["data"])  # a SlimFlow student is judged on its teacher's data
    dataset, num_classes = recipes.load_data(data)
    images_of = to_images({**run, "data": data}, device)
    x0, y = grid_inputs(tuple(dataset[0][0].shape), num_classes, num, seed, device)
    is_digits = data["kind"] == "digits"
    real = dataset.tensors[0]
    if data.get("vae"):  # (a SlimFlow student's pairs: its teacher's data)
        # a batch at a time: the decoded images of a whole folder need not fit on the device
        real = torch.cat([images_of(part.to(device)).cpu() for part in real.split(256)])
    classifier = metrics.load_classifier() if is_digits else None
    fid = None
    if inception is not None:
        from onestep_models.inception import FIDInception

        if not inception.is_file():
            raise ArgumentError(f"--inception: no such file: {inception}")
        fid = FIDInception.from_pytorch_fid(inception).to(device)
        real_fid = metrics.features(fid, real.to(device))
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "samples": num, "seed": seed,
                              "samplers": {}}
    for name, sample in {**model.samplers(), **(extra_samplers or {})}.items():
        start = time.perf_counter()
        images = images_of(sample(x0, y)).cpu()
        entry: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 2)}
        if is_digits:
            entry["digits_fd"] = metrics.digits_fd(images, real, classifier)
            if y is not None:
                entry["class_accuracy"] = metrics.class_accuracy(images, y.cpu(), classifier)
        if fid is not None:
            entry["fid"] = metrics.frechet_distance(metrics.features(fid, images.to(device)),
                                                    real_fid)
        result["samplers"][name] = entry
    if hasattr(model, "v"):
        result["straightness_euler128"] = metrics.straightness(model.v, x0, 128, y)
    return result


def print_table(result: dict[str, Any]) -> None:
    keys = sorted({k for e in result["samplers"].values() for k in e if k != "seconds"})
    print(f"{'sampler':<22}" + "".join(f"{k:>16}" for k in keys) + f"{'seconds':>10}")
    for name, entry in result["samplers"].items():
        cells = "".join(f"{entry[k]:>16.4g}" if k in entry else f"{'-':>16}" for k in keys)
        print(f"{name:<22}{cells}{entry['seconds']:>10.2f}")
    if "straightness_euler128" in result:
        print(f"straightness of v (128-step Euler path): {result['straightness_euler128']:.4g}")
