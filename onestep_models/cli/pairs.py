"""`onestep pairs`: a teacher's (noise, sample) pairs drawn into a folder
(onestep_models.slimflow_run.draw_pairs)."""

from __future__ import annotations

import torch

from onestep_models import slimflow_run
from onestep_models.cli.arguments import check_output_dir


def run(args, device: torch.device) -> int:
    check_output_dir(args.out, "--out")
    slimflow_run.draw_pairs(args.teacher, args.out, args.num, heun_steps=args.heun_steps,
                            seed=args.seed, device=device, shard_size=args.shard_size,
                            solver="rk45" if args.rk45 else "heun")
    return 0
