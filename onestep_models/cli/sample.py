"""`onestep sample`: a grid of samples from a run's EMA networks (CUDA graphs on a GPU), or
with `--screen N` from the teacher on screened noise."""

from __future__ import annotations

import time

import torch

from onestep_kernels.cuda_graph import graph_networks
from onestep_models import screening_run
from onestep_models.cli.arguments import UsageError, check_output_file, screen_pieces
from onestep_models.runs import load_run, sample_shape, to_images
from onestep_models.train import grid_inputs, save_grid


def run(args, device: torch.device) -> int:
    check_output_file(args.out, "--out", (".png",))
    start = time.perf_counter()
    pieces = screen_pieces(args, device)
    if pieces is not None:
        if args.sampler is not None:
            raise UsageError("--sampler: a screened sample is the teacher's one-step map's; "
                             "leave --sampler out with --screen")
        run_cfg = pieces["teacher_run"]
        name = f"screened_{args.screen}"
        samplers = {name: screening_run.screened_sampler(pieces, args.screen, args.seed)}
    else:
        model, run_cfg, _ = load_run(args.ckpt, device)
        graph_networks(model, enabled=device.type == "cuda" and not args.no_cuda_graph)
        samplers = model.samplers()
    name = args.sampler or next(iter(samplers))
    if name not in samplers:
        raise UsageError(f"--sampler: expected one of {', '.join(samplers)}, got {name!r}")
    x0, y = grid_inputs(sample_shape(run_cfg), run_cfg["model"].get("num_classes", 0),
                        args.num, args.seed, device)
    images = to_images(run_cfg, device)(samplers[name](x0, y))
    save_grid(images, args.out, nrow=max(1, round(args.num ** 0.5)))
    print(f"{args.num} samples ({name}) written to {args.out} in "
          f"{time.perf_counter() - start:.1f} s")
    return 0
