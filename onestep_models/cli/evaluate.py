"""`onestep eval`: every sampler of a run (and with `--screen N` the teacher on screened
noise) judged alike (onestep_models.evaluation), the table printed and written as JSON."""

from __future__ import annotations

import time

import torch

from onestep_models import screening_run
from onestep_models.cli.arguments import UsageError, check_output_file, screen_pieces
from onestep_models.evaluation import evaluate, print_table
from onestep_models.run_dir import run_directory, write_json_atomic


def run(args, device: torch.device) -> int:
    if not args.ckpt.exists():
        raise UsageError(f"--ckpt: no such file or directory: {args.ckpt}")
    out = args.out or run_directory(args.ckpt) / "metrics.json"
    check_output_file(out, "--out", (".json",))
    if args.inception is not None and not args.inception.is_file():
        raise UsageError(f"--inception: no such file: {args.inception}")
    start = time.perf_counter()
    pieces = screen_pieces(args, device)
    extra = {} if pieces is None else {
        f"screened_{args.screen}": screening_run.screened_sampler(pieces, args.screen, args.seed)}
    result = evaluate(args.ckpt, args.num, args.seed, device, args.inception, extra)
    write_json_atomic(out, result)
    print_table(result)
    print(f"metrics written to {out} in {time.perf_counter() - start:.1f} s")
    return 0
