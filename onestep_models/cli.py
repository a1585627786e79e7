"""The `onestep` command: train, sample, eval and the demo.

    onestep demo --out runs/demo             # Direct Model on the embedded digits, then eval
    onestep train direct --out runs/d1 --steps 5000 --lr 1e-3
    onestep sample --ckpt runs/d1 --out samples.png
    onestep eval --ckpt runs/d1

Errors of the user's making (bad arguments, missing, damaged or foreign files, changed
settings, a run directory in use) end with a one-line message and exit code 2; of the
machine's (a full disk, no memory) with one line and exit code 1; a run that stops on its own
terms says why (a non-finite loss: 1; an interrupt: 130); anything else is a bug in onestep,
shown with its traceback and a request for a report (onestep_kernels.errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from onestep_kernels.cuda_graph import graph_networks
from onestep_kernels.errors import UserError, report
from onestep_models import recipes, screening_run
from onestep_models.run_dir import RunLock, lock_holder, run_directory
from onestep_models.train import (
    TrainConfig,
    Trainer,
    grid_inputs,
    init_distributed,
    latest_checkpoint,
    load_weights,
    read_checkpoint_state,
    save_grid,
    seed_everything,
    world,
    write_json_atomic,
)


class UsageError(UserError):
    """A problem with what the user asked for: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


# The demo's settings: measured to finish (training + evaluation) in well under 10 minutes on
# 2 CPU cores and to meet the quality bar; see README "Direct Models on digits".
DEMO = dict(model="tiny", steps=3000, batch_size=128, lr=1e-3, warmup_steps=200, grad_clip=1.0,
            ema_decay=0.999, dt=0.05, eval_samples=1000)


def _number(kind, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse type: a finite `kind` in [low, high] (open ends where asked); argparse puts
    the flag's name before the message."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"expected {'>' if low_open else '>='} {low}, "
                                             f"got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"expected {'<' if high_open else '<='} {high}, "
                                             f"got {text}")
        return value
    return parse


def _positive(kind):
    return _number(kind, 0, low_open=True)


# Seeds: what every generator takes (numpy's legacy seeding stops at 2^32 - 1; torch's at 2^64,
# and seeds derived from a seed, per rank and stage, must stay below that).
SEED = _number(int, 0, 2**32 - 1)


def _add_train_arguments(p: argparse.ArgumentParser, demo: bool) -> None:
    p.add_argument("--out", type=Path, required=not demo,
                   default=Path("runs/demo") if demo else None,
                   help="run directory (checkpoints, logs, grids); an existing run resumes")
    p.add_argument("--steps", type=_positive(int), default=DEMO["steps"] if demo else 1000)
    p.add_argument("--batch-size", type=_positive(int), default=DEMO["batch_size"],
                   help="global batch, over all processes")
    p.add_argument("--lr", type=_positive(float), default=DEMO["lr"] if demo else 5e-5,
                   help="AdamW learning rate" + ("" if demo else " (the Direct Models paper's)"))
    p.add_argument("--seed", type=SEED, default=0,
                   help="fixes the networks' initialisation and every random draw "
                        "(0..2^32-1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--no-progress", action="store_true",
                   help="plain log lines instead of a progress bar (also when stderr is not a "
                        "terminal)")
    p.add_argument("--skip-nonfinite", type=_number(int, 0), default=0, metavar="N",
                   help="skip up to N steps whose loss or gradient is not finite (0: stop at "
                        "the first, keeping the last checkpoint)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks (a runtime choice: the math is the same)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though settings that change the math differ from the "
                        "run's (the change is logged)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume even though the data differs from what the run recorded in "
                        "its data.json (the change is logged)")
    if demo:
        p.add_argument("--eval-samples", type=_positive(int), default=DEMO["eval_samples"])
        return
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded) or an image folder (one subfolder per class)")
    p.add_argument("--size", type=_positive(int), default=None,
                   help="image side (digits: 8; folders: required)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="image folders: grey or colour")
    p.add_argument("--vae", type=Path, default=None,
                   help="image folders: a local AutoencoderKL directory; train on its latents")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image folders: skip files that cannot be decoded (counted on stderr) "
                        "instead of refusing them")
    p.add_argument("--model", default=None,
                   choices=list(recipes.MODEL_SIZES) + list(recipes.SLT_SIZES),
                   help="network size (default: tiny; slimflow's student: slim-32; slt: "
                        "slt-tiny)")
    p.add_argument("--unfused", action="store_true", help="reference DiT blocks, not fused")
    p.add_argument("--weight-decay", type=_number(float, 0), default=0.0)
    p.add_argument("--warmup-steps", type=_number(int, 0), default=0,
                   help="linear learning-rate warm-up")
    p.add_argument("--grad-clip", type=_number(float, 0), default=0.0,
                   help="max gradient norm (0: no clipping)")
    p.add_argument("--ema", type=_number(float, 0, 1, high_open=True), default=0.999,
                   help="EMA decay")
    p.add_argument("--checkpoint-every", type=_positive(int), default=500)
    p.add_argument("--keep-checkpoints", type=_positive(int), default=2,
                   help="how many of the newest checkpoints stay on disk")
    p.add_argument("--log-every", type=_positive(int), default=50)
    p.add_argument("--sample-every", type=_number(int, 0), default=0, metavar="N",
                   help="also write sample grids every N steps (0: at the end only)")
    p.add_argument("--grid-size", type=_positive(int), default=10, metavar="N",
                   help="N x N samples per grid, from each of the recipe's samplers")
    p.add_argument("--class-dropout", type=_number(float, 0, 1), default=0.1,
                   help="probability of the null label (classifier-free guidance)")
    p.add_argument("--dt", type=_number(float, 0, 0.5, low_open=True, high_open=True),
                   default=0.01, help="direct: the propagation step")
    p.add_argument("--no-stop-gradient", action="store_true",
                   help="direct: the paper's ablation without stop-gradient")
    p.add_argument("--parametrization", choices=("residual", "plain"), default="residual",
                   help="direct: phi = x0 + t w (residual) or x0 + w (the paper's ablation)")


TRAIN_RECIPES = ("flow", "direct", "slimflow", "slt")
# The SlimFlow demo's settings (after the Direct Models demo, whose flow is the teacher).
SLIMFLOW_DEMO = dict(num_pairs=4000, heun_steps=16, steps=3000, anneal_steps=1500,
                     distill_steps=1000, student="slim-32", batch_size=128, lr=2e-3)


def _add_slimflow_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slimflow (train slimflow --teacher RUN)")
    g.add_argument("--teacher", type=Path, default=None,
                   help="the teacher run (flow, direct or SlimFlow) whose EMA velocity "
                        "draws the pairs")
    g.add_argument("--pairs", type=Path, default=None,
                   help="pairs made by `onestep pairs` (default: <out>/pairs, drawn here)")
    g.add_argument("--stage", choices=("both", "reflow", "distill"), default="both")
    # (None when not given: with --pairs they cannot apply, and giving them is an error)
    g.add_argument("--num-pairs", type=_positive(int), default=None,
                   help="pairs to draw here (default 10000; not with --pairs)")
    g.add_argument("--heun-steps", type=_positive(int), default=None,
                   help="Heun steps of the teacher's ODE for the pairs drawn here (default 32; "
                        "not with --pairs)")
    g.add_argument("--anneal-steps", type=_number(int, 0), default=1000,
                   help="K: beta anneals from 1 to 0 over the first K reflow steps (0: none)")
    g.add_argument("--anneal-schedule", choices=("linear", "exp", "cos"), default="linear")
    g.add_argument("--hflip", action="store_true", help="flip pairs left-right at random")
    g.add_argument("--no-guidance", action="store_true",
                   help="distillation without the flow-guided term (the ablation)")
    g.add_argument("--distill-steps", type=_positive(int), default=500)
    g.add_argument("--distance", choices=("pseudo_huber", "lpips"), default="pseudo_huber",
                   help="the distillation's D (lpips needs --vgg and --lpips)")
    g.add_argument("--vgg", type=Path, default=None,
                   help="torchvision's VGG16 state dict (vgg16-397923af.pth), for LPIPS")
    g.add_argument("--lpips", type=Path, default=None,
                   help="the lpips package's VGG heads (v0.1 vgg.pth), for LPIPS")


def _add_slt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slt (train slt --teacher RUN: a Single-Layer Transformer distilled "
                             "from a one-step run, data-free)")
    g.add_argument("--depth-steps", type=_positive(int), default=None,
                   help="K, the applications of the one block (default: the teacher's depth)")
    g.add_argument("--patches", type=_positive(int), default=4,
                   help="P, the depth patches matched against the teacher (and fused by the "
                        "head)")
    g.add_argument("--feature-weight", type=_number(float, 0), default=1.0,
                   help="the weight of depth-patch feature matching (0: output only)")
    g.add_argument("--output-weight", type=_number(float, 0), default=1.0,
                   help="the weight of the output alignment")
    g.add_argument("--no-fusion", action="store_true",
                   help="the SLT's head reads its last state alone (the ablation), not the "
                        "fusion of the P matched ones")
    g.add_argument("--slt-patch-size", type=_positive(int), default=None,
                   help="the SLT's patch size (a multiple of the teacher's; default: its size's)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="onestep", description="One-step image generators on fused DiT kernels.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    train = sub.add_parser("train", help="train a recipe", **defaults)
    train.add_argument("recipe", choices=TRAIN_RECIPES)
    _add_train_arguments(train, demo=False)
    _add_slimflow_arguments(train)
    _add_slt_arguments(train)
    demo = sub.add_parser("demo", help="train a Direct Model on digits, then evaluate it",
                          **defaults)
    _add_train_arguments(demo, demo=True)
    demo.add_argument("--method", choices=("direct", "slimflow", "slt"), default="direct",
                      help="slimflow: then distil the Direct Model's flow into a student "
                           "with SlimFlow, and evaluate it; slt: a deep Direct Model (depth 8), "
                           "then a Single-Layer Transformer distilled from its one-step map")
    pairs = sub.add_parser("pairs", help="draw (noise, sample) pairs from a teacher's ODE",
                           **defaults)
    pairs.add_argument("--teacher", type=Path, required=True,
                       help="a trained flow, direct or SlimFlow run (its EMA velocity)")
    pairs.add_argument("--out", type=Path, required=True, help="pairs directory (resumes)")
    pairs.add_argument("--num", "--num-pairs", dest="num", type=_positive(int), default=10_000,
                       help="how many pairs (under torchrun write --num-pairs: torchrun takes "
                            "--num for its own --numa-binding)")
    pairs.add_argument("--heun-steps", type=_positive(int), default=32,
                       help="Heun steps of the teacher's ODE (2 evaluations each)")
    pairs.add_argument("--rk45", action="store_true",
                       help="integrate with scipy's adaptive RK45 instead of Heun")
    pairs.add_argument("--shard-size", type=_positive(int), default=1024)
    pairs.add_argument("--seed", type=SEED, default=0)
    pairs.add_argument("--device", default=None)
    sample = sub.add_parser("sample", help="write a grid of samples from a checkpoint",
                            **defaults)
    sample.add_argument("--ckpt", type=Path, required=True,
                        help="a run, its checkpoints/ folder or one checkpoint (the newest "
                             "intact one is used)")
    sample.add_argument("--out", type=Path, required=True, help="PNG file")
    sample.add_argument("--sampler", default=None, help="default: the recipe's first")
    sample.add_argument("--num", type=_positive(int), default=100)
    sample.add_argument("--seed", type=SEED, default=0)
    sample.add_argument("--device", default=None)
    sample.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, call the networks eagerly instead of replaying CUDA graphs")
    _add_screen_arguments(sample)
    ev = sub.add_parser("eval", help="digits-FD, class accuracy, FID and straightness",
                        **defaults)
    ev.add_argument("--ckpt", type=Path, required=True,
                    help="a run, its checkpoints/ folder or one checkpoint")
    ev.add_argument("--num", type=_positive(int), default=1000, help="samples per sampler")
    ev.add_argument("--inception", type=Path, default=None,
                    help="pytorch-fid Inception weights (.pth) for FID on 3-channel images")
    ev.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: metrics.json in the run directory)")
    ev.add_argument("--seed", type=SEED, default=1)
    ev.add_argument("--device", default=None)
    _add_screen_arguments(ev)
    return parser


def _add_screen_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("noise screening (the teacher samples each condition's best of N "
                             "noises, as an SLT distilled from it scores them)")
    g.add_argument("--screen", type=_positive(int), default=None, metavar="N",
                   help="candidate noises per sample (--ckpt: the teacher run)")
    g.add_argument("--slt", type=Path, default=None,
                   help="the SLT run that scores them (onestep train slt --teacher CKPT)")
    g.add_argument("--scorer", choices=screening_run.SCORERS, default="preview",
                   help="preview: a class head on the SLT's own sample; null_state: a class "
                        "head on its null-label state; cosine: label-free")


def _screen_pieces(args, device: torch.device):
    """The screened sampler's pieces for --screen, or None; --slt alone is a usage error."""
    if args.screen is None:
        if args.slt is not None:
            raise UsageError("--slt: goes with --screen N (how many noises to screen)")
        return None
    return screening_run.load_screening(args.ckpt, args.slt, device, args.scorer,
                                        cuda_graphs=not getattr(args, "no_cuda_graph", False))


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device: expected cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device: cuda asked for, but torch sees no GPU")
    return torch.device(name)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(path: Path, flag: str) -> None:
    """Before any work: `path` is (or can be made) a writable directory."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {path} exists and is not a directory")
    base = _existing_ancestor(path)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write into {base}")


def check_output_file(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    """Before any work: `path` names a file with a known extension in a writable directory."""
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag}: expected a file name ending in {' or '.join(suffixes)}, "
                         f"got {path}")
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a directory")
    if not path.parent.absolute().is_dir():
        raise UsageError(f"{flag}: no such directory: {path.parent}")
    if not os.access(path.parent.absolute(), os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write into {path.parent}")
    holder = lock_holder(path.parent)
    if holder is not None:  # (reading a running run is fine; writing into its folder is not)
        raise UsageError(f"{flag}: {path.parent} is being written by a run (pid {holder}); "
                         f"write {path.name} elsewhere")


def _run_config(args, recipe: str):
    """(run config, dataset, classes) from `train`'s arguments (see onestep_models.recipes)."""
    if args.data == "digits":
        if args.vae is not None:
            raise UsageError("--vae: digits are trained as images; --vae needs --data FOLDER")
        data = {"kind": "digits", "size": args.size or 8}
    else:
        if not Path(args.data).is_dir():
            raise UsageError(f"--data: no such directory: {args.data}")
        if args.size is None:
            raise UsageError("--size: required for an image folder")
        if args.vae is not None and not (args.vae / "config.json").is_file():
            raise UsageError(f"--vae: no AutoencoderKL (config.json) in {args.vae}")
        data = {"kind": "folder", "path": str(Path(args.data).resolve()), "size": args.size,
                "channels": args.channels, "vae": str(args.vae.resolve()) if args.vae else None}
        if args.skip_bad_images:  # (recorded only when given: older runs' configs stay equal)
            data["skip_bad_images"] = True
    options = recipes.default_options(recipe)
    options["class_dropout"] = args.class_dropout
    if recipe == "direct":
        options.update(dt=args.dt, stop_gradient=not args.no_stop_gradient,
                       parametrization=args.parametrization)
    return recipes.run_config(recipe, data, args.model or "tiny", not args.unfused, options)


def _slt_run_config(args):
    """(run config, data-free dataset, classes) of `train slt` (onestep_models.recipes)."""
    if args.teacher is None:
        raise UsageError("--teacher: required: the one-step run (Direct Models or SlimFlow) "
                         "to distil")
    if not args.teacher.exists():
        raise UsageError(f"--teacher: no such file or directory: {args.teacher}")
    model = args.model or "slt-tiny"
    if model not in recipes.SLT_SIZES:
        raise UsageError(f"--model: {model!r} is not an SLT size (expected one of "
                         f"{', '.join(recipes.SLT_SIZES)})")
    options = {**recipes.default_options("slt"), "class_dropout": args.class_dropout,
               "patches": args.patches, "feature_weight": args.feature_weight,
               "output_weight": args.output_weight}
    return recipes.slt_run_config(args.teacher, model, not args.unfused, options,
                                  depth_steps=args.depth_steps, patch_size=args.slt_patch_size,
                                  fusion=not args.no_fusion)


def train(run: dict[str, Any], dataset, num_classes: int, tcfg: TrainConfig, out: Path,
          device: torch.device, progress: bool, allow_config_change: bool = False,
          allow_data_change: bool = False, init=None, compile: bool = False) -> Trainer:
    """Build the run's networks (seeded), `init(model)` them if given (a later stage starting
    from an earlier one's weights; the run's own checkpoint, when there is one, wins) and
    train them; `run` is recipes' run config."""
    seed_everything(tcfg.seed)  # the networks' initialisation is part of the seeded run
    model = recipes.build(run)
    if init is not None:
        init(model)
    trainer = Trainer(model, dataset, tcfg, out, run_config=run, num_classes=num_classes,
                      device=device, progress=progress, allow_config_change=allow_config_change,
                      allow_data_change=allow_data_change,
                      compile=compile, to_images=_to_images(run, device))
    trainer.fit(resume=True)
    return trainer


def report_training(trainer: Trainer, tcfg: TrainConfig, out: Path, seconds: float) -> None:
    """The closing line of a training command."""
    if trainer.rank != 0:
        return
    done = trainer.step - trainer.start_step
    print(f"trained {done} steps ({trainer.start_step} -> {trainer.step}) in {seconds:.1f} s, "
          f"{done * tcfg.batch_size / max(seconds, 1e-9):.0f} images/s; checkpoints, "
          f"log.jsonl and grids in {out}" if done else
          f"nothing to train: {out} is at step {trainer.step} (--steps {tcfg.steps})")


def draw_pairs(teacher_ckpt: Path, out: Path, num: int, *, heun_steps: int, seed: int,
               device: torch.device, shard_size: int = 1024, solver: str = "heun") -> None:
    """The teacher run's EMA velocity integrated from seeded noise into `out`'s pair shards
    (onestep_models.slimflow.generate_pairs), a line per shard and a closing line with the
    pairs per second; the manifest records the teacher's checkpoint and data."""
    # under torchrun the processes share the shards, each on its own GPU, then wait for all
    device = init_distributed(device)
    rank, world_size = world()
    teacher, teacher_run, checkpoint = recipes.load_teacher(teacher_ckpt, device)
    shape = _sample_shape(teacher_run)
    # one writer per folder: a second `onestep pairs` (or a run) into it is refused; the
    # processes of one torchrun are one writer, rank 0 holding the lock for them all
    lock = RunLock(out).acquire() if rank == 0 else None
    try:
        _draw_pairs_locked(teacher, teacher_run, checkpoint, out, num, shape, rank,
                           world_size, heun_steps=heun_steps, seed=seed, device=device,
                           shard_size=shard_size, solver=solver)
    finally:
        if lock is not None:
            lock.release()


def _draw_pairs_locked(teacher, teacher_run, checkpoint, out, num, shape, rank, world_size, *,
                       heun_steps, seed, device, shard_size, solver) -> None:
    from onestep_models import slimflow as sf

    model = teacher_run["model"]
    start = time.perf_counter()
    made = [0]

    def report(shard: int, total: int) -> None:
        made[0] += 1
        rate = made[0] * shard_size * world_size / max(time.perf_counter() - start, 1e-9)
        if rank == 0:
            print(f"shard {shard}/{total}  {rate:.0f} pairs/s", flush=True)

    sf.generate_pairs(teacher, out, num, shape, model.get("num_classes", 0),
                      shard_size=shard_size, heun_steps=heun_steps, solver=solver, seed=seed,
                      device=device, progress=report, part=(rank, world_size),
                      settings={"checkpoint": str(checkpoint.resolve()),
                                "data": teacher_run["data"]})
    if world_size > 1:
        torch.distributed.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        drawn = made[0] * shard_size * world_size  # (shards finished earlier are not redrawn)
        rate = (f"{min(drawn, num) / max(seconds, 1e-9):.0f} pairs/s" if drawn
                else "all finished before: nothing drawn")
        print(f"{num} pairs in {out} ({seconds:.1f} s, {rate})")


def slimflow(args, tcfg: TrainConfig, device: torch.device, *, num_pairs: int, heun_steps: int,
             stage: str, student: str, anneal_steps: int, schedule: str, hflip: bool,
             guidance: bool, distill_steps: int, distance: str = "pseudo_huber",
             lpips_weights: dict[str, str] | None = None) -> dict[str, Path]:
    """SlimFlow's stages into args.out: pairs/ (from args.teacher, unless args.pairs), then
    reflow/ (Annealing Reflow, tcfg.steps) and distill/ (Flow-Guided Distillation,
    `distill_steps`), each a run directory of its own; returns them."""
    from onestep_models.run_dir import load_tensors

    out = args.out
    dirs = {"pairs": args.pairs or out / "pairs", "reflow": out / "reflow",
            "distill": out / "distill"}
    if args.pairs is None:
        if args.teacher is None:
            raise UsageError("--teacher: required to draw the pairs (or give --pairs)")
        draw_pairs(args.teacher, dirs["pairs"], num_pairs, heun_steps=heun_steps,
                   seed=tcfg.seed, device=device)
    data = {"kind": "pairs", "path": str(Path(dirs["pairs"]).resolve())}
    if stage in ("both", "reflow"):
        run, dataset, num_classes = recipes.run_config(
            "slimflow_reflow", data, student, True,
            {"anneal_steps": anneal_steps, "schedule": schedule, "hflip": hflip})
        start = time.perf_counter()
        trainer = train(run, dataset, num_classes, tcfg, dirs["reflow"], device,
                        progress=not args.no_progress,
                        allow_config_change=args.allow_config_change,
                        allow_data_change=args.allow_data_change,
                        compile=getattr(args, "compile", False))
        report_training(trainer, tcfg, dirs["reflow"], time.perf_counter() - start)
    if stage in ("both", "distill"):
        init_from = latest_checkpoint(dirs["reflow"])
        if init_from is None:
            raise UsageError(f"--stage distill: no Annealing Reflow checkpoint in "
                             f"{dirs['reflow']}")
        reflow_run = read_checkpoint_state(init_from)["config"]
        run, dataset, num_classes = recipes.run_config(
            "slimflow_distill", data, student, True,
            {"distance": distance, "guidance": guidance, "init": str(init_from.resolve()),
             **({"lpips_weights": lpips_weights} if distance == "lpips" else {})})
        run["model"] = reflow_run["model"]  # the student stage 1 trained

        def start_from_stage_one(recipe) -> None:
            from onestep_models.run_dir import load_into

            for which, net in (("model", recipe.v), ("ema", recipe.guide)):
                path = init_from / f"{which}.safetensors"
                tensors = {k[2:]: v for k, v in load_tensors(path).items() if k.startswith("v.")}
                load_into(net, tensors, path)

        distill = dataclasses.replace(tcfg, steps=distill_steps,
                                      checkpoint_every=min(tcfg.checkpoint_every, distill_steps))
        start = time.perf_counter()
        trainer = train(run, dataset, num_classes, distill, dirs["distill"], device,
                        progress=not args.no_progress,
                        allow_config_change=args.allow_config_change,
                        allow_data_change=args.allow_data_change,
                        init=start_from_stage_one, compile=getattr(args, "compile", False))
        report_training(trainer, distill, dirs["distill"], time.perf_counter() - start)
    return dirs


def load_run(ckpt: Path, device: torch.device):
    """(EMA recipe module, run config, checkpoint path) from a run or checkpoint directory."""
    if not ckpt.exists():
        raise UsageError(f"--ckpt: no such file or directory: {ckpt}")
    checkpoint = latest_checkpoint(ckpt)
    if checkpoint is None:
        raise UsageError(f"--ckpt: no checkpoint (checkpoints/step_*/state.json) under {ckpt}")
    run = read_checkpoint_state(checkpoint)["config"]
    model = recipes.build(run, training=False)
    load_weights(model, checkpoint, "ema")
    return model.to(device).eval(), run, checkpoint


def _sample_shape(run: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of a run's samples, from its model config (its data need not be at hand)."""
    model = run["model"]
    return model["in_channels"], model["input_size"], model["input_size"]


def _to_images(run: dict[str, Any], device: torch.device):
    """Samples → images in [-1, 1]: identity, or the VAE decoder for runs on latents (a
    SlimFlow student's pairs are latents where its teacher's data are). The VAE is loaded at
    the first call, not before: training holds it only once it writes a grid."""
    vae_path = recipes.real_data(run["data"]).get("vae")
    if not vae_path:
        return lambda x: x.clamp(-1, 1)
    from onestep_models.data import decode_latents, load_vae

    @functools.cache
    def vae():
        return load_vae(vae_path).to(device)

    return lambda x: decode_latents(x, vae())


def evaluate(ckpt: Path, num: int, seed: int, device: torch.device,
             inception: Path | None = None, extra_samplers: dict | None = None
             ) -> dict[str, Any]:
    """Every sampler of the run (and `extra_samplers`, (x0, y) -> samples, such as a screened
    one) on the same noise and labels, judged alike."""
    from onestep_models import metrics

    model, run, checkpoint = load_run(ckpt, device)
    data = recipes.real_data(run["data"])  # a SlimFlow student is judged on its teacher's data
    dataset, num_classes = recipes.load_data(data)
    to_images = _to_images({**run, "data": data}, device)
    x0, y = grid_inputs(tuple(dataset[0][0].shape), num_classes, num, seed, device)
    is_digits = data["kind"] == "digits"
    real = dataset.tensors[0]
    if data.get("vae"):  # (a SlimFlow student's pairs: its teacher's data)
        # a batch at a time: the decoded images of a whole folder need not fit on the device
        real = torch.cat([to_images(part.to(device)).cpu() for part in real.split(256)])
    classifier = metrics.load_classifier() if is_digits else None
    fid = None
    if inception is not None:
        from onestep_models.inception import FIDInception

        if not inception.is_file():
            raise UsageError(f"--inception: no such file: {inception}")
        fid = FIDInception.from_pytorch_fid(inception).to(device)
        real_fid = metrics.features(fid, real.to(device))
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "samples": num, "seed": seed,
                              "samplers": {}}
    for name, sample in {**model.samplers(), **(extra_samplers or {})}.items():
        start = time.perf_counter()
        images = to_images(sample(x0, y)).cpu()
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


def slimflow_demo(args, device: torch.device, direct: dict[str, Any]) -> bool:
    """SlimFlow after the Direct Models demo: the demo's flow v is the teacher; a student with
    about 1/4 of its parameters is trained in both stages into <out>/slimflow, evaluated, and
    checked against the bars (printed as PASS/FAIL); True when all pass."""
    from onestep_models import slimflow as sf

    # the demo's settings; a shorter direct demo (--steps below its default) scales them down
    scale = min(1.0, args.steps / DEMO["steps"])
    d = dict(SLIMFLOW_DEMO)
    for key, least in (("steps", 1), ("anneal_steps", 0), ("distill_steps", 1),
                       ("num_pairs", 64)):
        d[key] = max(least, round(SLIMFLOW_DEMO[key] * scale))
    sf_args = argparse.Namespace(out=args.out / "slimflow", teacher=args.out, pairs=None,
                                 no_progress=args.no_progress,
                                 allow_config_change=args.allow_config_change,
                                 allow_data_change=args.allow_data_change)
    tcfg = TrainConfig(steps=d["steps"], batch_size=d["batch_size"], lr=d["lr"],
                       warmup_steps=100, grad_clip=1.0, ema_decay=0.999, seed=args.seed,
                       checkpoint_every=max(1, d["steps"] // 4),
                       log_every=max(1, min(100, d["steps"] // 10)))
    start = time.perf_counter()
    dirs = slimflow(sf_args, tcfg, device, num_pairs=d["num_pairs"], heun_steps=d["heun_steps"],
                    stage="both", student=d["student"], anneal_steps=d["anneal_steps"],
                    schedule="linear", hflip=False, guidance=True,
                    distill_steps=d["distill_steps"])
    result = {"reflow": evaluate(dirs["reflow"], args.eval_samples, 1, device),
              "distill": evaluate(dirs["distill"], args.eval_samples, 1, device)}
    teacher, _, _ = recipes.load_teacher(args.out)
    student_model, _, _ = load_run(dirs["distill"], torch.device("cpu"))
    shape = (1, 1, 8, 8)
    x, t, y = torch.zeros(shape), torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)
    sizes = {name: {"parameters": sum(p.numel() for p in net.parameters()),
                    "macs_per_image": sf.count_macs(net, x, t, y)}
             for name, net in (("teacher", teacher.cpu()), ("student", student_model.v))}
    fd = {"student_1step": result["distill"]["samplers"]["slimflow_1step"]["digits_fd"],
          "reflow_1step": result["reflow"]["samplers"]["slimflow_1step"]["digits_fd"],
          "teacher_euler_1step": direct["samplers"]["flow_euler_1step"]["digits_fd"],
          "direct_1step": direct["samplers"]["direct_1step"]["digits_fd"]}
    bars = {
        "student parameters <= 1/4 of the teacher's":
            sizes["student"]["parameters"] <= sizes["teacher"]["parameters"] / 4,
        "student FD <= 1/3 of the teacher's 1-step Euler FD":
            fd["student_1step"] <= fd["teacher_euler_1step"] / 3,
        "student FD <= 2x the Direct Model's 1-step FD":
            fd["student_1step"] <= 2 * fd["direct_1step"],
        "annealing-reflow student straighter than the teacher":
            result["reflow"]["straightness_euler128"] < direct["straightness_euler128"],
    }
    summary = {"sizes": sizes, "digits_fd": fd, "bars": bars,
               "straightness": {"teacher": direct["straightness_euler128"],
                                "reflow_student": result["reflow"]["straightness_euler128"]},
               "stages": result, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(args.out / "slimflow" / "metrics.json", summary)
    print(f"SlimFlow: student {sizes['student']['parameters']:,} parameters, "
          f"{sizes['student']['macs_per_image']:,} MACs/image; teacher "
          f"{sizes['teacher']['parameters']:,}, {sizes['teacher']['macs_per_image']:,}")
    print("digits-FD: " + ", ".join(f"{k} {v:.4g}" for k, v in fd.items()))
    for what, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    print(f"SlimFlow in {summary['seconds']:.0f} s; metrics in {args.out / 'slimflow'}")
    return all(bars.values())


# The SLT demo's settings: the Direct Model of the demo at the "deep" size is the teacher.
SLT_DEMO = dict(teacher="deep", student="slt-tiny", screener="slt-screen-tiny", steps=2000,
                batch_size=128, lr=2e-3, patches=4)


def slt_demo(args, device: torch.device, direct: dict[str, Any]) -> bool:
    """The SLT after the Direct Models demo at the deep size: its one-step map (w at t = 1) is
    the teacher; an SLT is distilled into <out>/slt (data-free), evaluated, its per-patch
    cosine similarity to the teacher's states measured, and checked against the bars (printed
    as PASS/FAIL); True when all pass."""
    from onestep_models.run_dir import load_weights

    scale = min(1.0, args.steps / DEMO["steps"])
    steps = max(1, round(SLT_DEMO["steps"] * scale))
    out = args.out / "slt"
    options = {**recipes.default_options("slt"), "patches": SLT_DEMO["patches"]}
    run, dataset, num_classes = recipes.slt_run_config(args.out, SLT_DEMO["student"], True,
                                                       options)
    tcfg = TrainConfig(steps=steps, batch_size=SLT_DEMO["batch_size"], lr=SLT_DEMO["lr"],
                       warmup_steps=100, grad_clip=1.0, ema_decay=0.999, seed=args.seed,
                       checkpoint_every=max(1, steps // 4), log_every=max(1, min(100, steps // 10)))
    start = time.perf_counter()
    trainer = train(run, dataset, num_classes, tcfg, out, device, progress=not args.no_progress,
                    allow_config_change=args.allow_config_change,
                    allow_data_change=args.allow_data_change)
    report_training(trainer, tcfg, out, time.perf_counter() - start)
    result = evaluate(out, args.eval_samples, 1, device)
    # per-patch cosine similarity of the SLT's (EMA) states to the teacher's, on fixed noise
    recipe = recipes.build(run).to(device).eval()
    load_weights(recipe, latest_checkpoint(out), "ema")
    x0, y = grid_inputs(_sample_shape(run), num_classes, args.eval_samples, 1, device)
    with torch.no_grad():
        cosines = recipe.patch_cosines(x0, y)
    teacher_parameters = sum(p.numel() for p in recipe._teacher.net.parameters())
    slt_parameters = sum(p.numel() for p in recipe.student.parameters() if p.requires_grad)
    slt, teacher = result["samplers"]["slt_1step"], direct["samplers"]["direct_1step"]
    bars = {
        "SLT parameters <= 1/4 of the teacher's": slt_parameters <= teacher_parameters / 4,
        "SLT 1-step FD <= 2x the teacher's 1-step FD": slt["digits_fd"] <= 2 * teacher["digits_fd"],
        "SLT class accuracy within 3 points of the teacher's":
            slt["class_accuracy"] >= teacher["class_accuracy"] - 0.03,
    }
    summary = {"parameters": {"slt": slt_parameters, "teacher": teacher_parameters},
               "digits_fd": {"slt_1step": slt["digits_fd"], "teacher_1step": teacher["digits_fd"]},
               "class_accuracy": {"slt_1step": slt["class_accuracy"],
                                  "teacher_1step": teacher["class_accuracy"]},
               "patch_cosines": cosines, "bars": bars, "slt": result,
               "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(out / "metrics.json", summary)
    print(f"SLT: {slt_parameters:,} parameters (teacher {teacher_parameters:,}); 1-step "
          f"digits-FD {slt['digits_fd']:.4g} (teacher {teacher['digits_fd']:.4g}), accuracy "
          f"{slt['class_accuracy']:.3f} (teacher {teacher['class_accuracy']:.3f}); per-patch "
          f"cosine similarity " + ", ".join(f"{c:.3f}" for c in cosines))
    for what, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    print(f"SLT in {summary['seconds']:.0f} s; metrics in {out}")
    return screening_demo(args, device, tcfg) and all(bars.values())


def screening_demo(args, device: torch.device, tcfg: TrainConfig) -> bool:
    """Noise screening after the SLT demo: a screening SLT (slt-screen-tiny: one token, the
    time budget's design scaled to the digits) distilled from the same teacher into
    <out>/screen with the SLT's settings, then the teacher sampled from screened noise at
    N = 1 (random), 8, 32, 128 and judged (screening_run.screening_table); the table, its
    bars (PASS/FAIL) and screening.png. True when all pass."""
    out = args.out / "screen"
    options = {**recipes.default_options("slt"), "patches": SLT_DEMO["patches"]}
    run, dataset, num_classes = recipes.slt_run_config(args.out, SLT_DEMO["screener"], True,
                                                       options)
    start = time.perf_counter()
    trainer = train(run, dataset, num_classes, tcfg, out, device, progress=not args.no_progress,
                    allow_config_change=args.allow_config_change,
                    allow_data_change=args.allow_data_change)
    report_training(trainer, tcfg, out, time.perf_counter() - start)
    pieces = screening_run.load_screening(args.out, out, device, "preview")
    table = screening_run.screening_table(pieces, device,
                                          per_class=max(5, args.eval_samples // 10))
    bars = screening_run.screening_bars(table)
    screening_run.plot_screening_table(table, out / "screening.png")
    summary = {**table, "bars": bars, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(out / "metrics.json", summary)
    screening_run.print_screening_table(table)
    for what, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    print(f"noise screening in {summary['seconds']:.0f} s; table, screening.png and "
          f"metrics.json in {out}")
    return all(bars.values())


def quality_bar(result: dict[str, Any]) -> dict[str, Any]:
    """The Direct Models bar on digits: 1-step w's digits-FD at most 1/3 of 1-step Euler flow's;
    its class accuracy at least 80% of the 128-step flow's."""
    s = result["samplers"]
    direct, euler1, euler128 = s["direct_1step"], s["flow_euler_1step"], s["flow_euler_128step"]
    fd_ratio = direct["digits_fd"] / euler1["digits_fd"]
    acc_ratio = direct["class_accuracy"] / max(euler128["class_accuracy"], 1e-12)
    return {"fd_ratio_direct_over_euler1": fd_ratio, "fd_ratio_ok": fd_ratio <= 1 / 3,
            "accuracy_ratio_direct_over_euler128": acc_ratio, "accuracy_ratio_ok": acc_ratio >= 0.8}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        device = _device(args.device)
        if args.command in ("train", "demo"):
            check_output_dir(args.out, "--out")
            recipe = "direct" if args.command == "demo" else args.recipe
            if args.command == "demo":
                tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=DEMO["warmup_steps"],
                                   grad_clip=DEMO["grad_clip"], ema_decay=DEMO["ema_decay"],
                                   seed=args.seed, checkpoint_every=max(1, args.steps // 4),
                                   log_every=max(1, min(100, args.steps // 10)),
                                   skip_nonfinite=args.skip_nonfinite)
                run, dataset, num_classes = recipes.run_config(
                    "direct", {"kind": "digits", "size": 8},
                    SLT_DEMO["teacher"] if args.method == "slt" else DEMO["model"], True,
                    {**recipes.default_options("direct"), "dt": DEMO["dt"]})
            else:
                tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                                   grad_clip=args.grad_clip, ema_decay=args.ema, seed=args.seed,
                                   checkpoint_every=args.checkpoint_every,
                                   keep_checkpoints=args.keep_checkpoints,
                                   log_every=args.log_every, sample_every=args.sample_every,
                                   grid_size=args.grid_size, skip_nonfinite=args.skip_nonfinite)
                if recipe == "slimflow":
                    run = dataset = num_classes = None  # the stages make their own
                elif recipe == "slt":
                    run, dataset, num_classes = _slt_run_config(args)
                else:
                    run, dataset, num_classes = _run_config(args, recipe)
            if recipe == "slimflow":
                weights = None
                if args.distance == "lpips":
                    for flag, path in (("--vgg", args.vgg), ("--lpips", args.lpips)):
                        if path is None or not path.is_file():
                            raise UsageError(f"{flag}: --distance lpips needs the local weights "
                                             f"file, got {path}")
                    weights = {"vgg": str(args.vgg.resolve()), "lins": str(args.lpips.resolve())}
                if args.pairs is not None:
                    for flag, value in (("--num-pairs", args.num_pairs),
                                        ("--heun-steps", args.heun_steps)):
                        if value is not None:
                            raise UsageError(f"{flag}: the pairs are --pairs {args.pairs}, "
                                             "drawn already with their own settings; leave "
                                             f"{flag} out (it applies where train slimflow "
                                             "draws them)")
                slimflow(args, tcfg, device, num_pairs=args.num_pairs or 10_000,
                         heun_steps=args.heun_steps or 32, stage=args.stage,
                         student=args.model or "slim-32", anneal_steps=args.anneal_steps,
                         schedule=args.anneal_schedule, hflip=args.hflip,
                         guidance=not args.no_guidance, distill_steps=args.distill_steps,
                         distance=args.distance, lpips_weights=weights)
                return 0
            start = time.perf_counter()
            trainer = train(run, dataset, num_classes, tcfg, args.out, device,
                            progress=not args.no_progress,
                            allow_config_change=args.allow_config_change,
                            allow_data_change=args.allow_data_change,
                            compile=args.compile)
            report_training(trainer, tcfg, args.out, time.perf_counter() - start)
            if args.command == "demo" and trainer.rank == 0:
                trained = time.perf_counter() - start
                result = evaluate(args.out, args.eval_samples, 1, device)
                result["quality_bar"] = quality_bar(result)
                result["train_seconds"] = round(trained, 1)
                result["total_seconds"] = round(time.perf_counter() - start, 1)
                write_json_atomic(args.out / "metrics.json", result)
                print_table(result)
                bar = result["quality_bar"]
                verdict = {True: "PASS", False: "FAIL"}
                print(f"{verdict[bar['fd_ratio_ok']]}: direct 1-step FD / Euler 1-step FD = "
                      f"{bar['fd_ratio_direct_over_euler1']:.3f} (bar: <= 0.333)\n"
                      f"{verdict[bar['accuracy_ratio_ok']]}: direct 1-step accuracy / Euler "
                      f"128-step accuracy = {bar['accuracy_ratio_direct_over_euler128']:.3f} "
                      f"(bar: >= 0.8)\n"
                      f"grids and metrics.json in {args.out}; "
                      f"{result['total_seconds']:.0f} s in all")
                passed = bar["fd_ratio_ok"] and bar["accuracy_ratio_ok"]
                if args.method == "slimflow":
                    passed = slimflow_demo(args, device, result) and passed
                if args.method == "slt":
                    passed = slt_demo(args, device, result) and passed
                if not passed:
                    return 1
            return 0
        if args.command == "pairs":
            check_output_dir(args.out, "--out")
            draw_pairs(args.teacher, args.out, args.num, heun_steps=args.heun_steps,
                       seed=args.seed, device=device, shard_size=args.shard_size,
                       solver="rk45" if args.rk45 else "heun")
            return 0
        if args.command == "sample":
            check_output_file(args.out, "--out", (".png",))
            start = time.perf_counter()
            pieces = _screen_pieces(args, device)
            if pieces is not None:
                if args.sampler is not None:
                    raise UsageError("--sampler: a screened sample is the teacher's one-step "
                                     "map's; leave --sampler out with --screen")
                run = pieces["teacher_run"]
                name = f"screened_{args.screen}"
                samplers = {name: screening_run.screened_sampler(pieces, args.screen, args.seed)}
            else:
                model, run, _ = load_run(args.ckpt, device)
                graph_networks(model, enabled=device.type == "cuda" and not args.no_cuda_graph)
                samplers = model.samplers()
            name = args.sampler or next(iter(samplers))
            if name not in samplers:
                raise UsageError(f"--sampler: expected one of {', '.join(samplers)}, got {name!r}")
            x0, y = grid_inputs(_sample_shape(run), run["model"].get("num_classes", 0),
                                args.num, args.seed, device)
            images = _to_images(run, device)(samplers[name](x0, y))
            save_grid(images, args.out, nrow=max(1, round(args.num ** 0.5)))
            print(f"{args.num} samples ({name}) written to {args.out} in "
                  f"{time.perf_counter() - start:.1f} s")
            return 0
        if args.command == "eval":
            if not args.ckpt.exists():
                raise UsageError(f"--ckpt: no such file or directory: {args.ckpt}")
            out = args.out or run_directory(args.ckpt) / "metrics.json"
            check_output_file(out, "--out", (".json",))
            if args.inception is not None and not args.inception.is_file():
                raise UsageError(f"--inception: no such file: {args.inception}")
            start = time.perf_counter()
            pieces = _screen_pieces(args, device)
            extra = {} if pieces is None else {
                f"screened_{args.screen}": screening_run.screened_sampler(pieces, args.screen,
                                                                          args.seed)}
            result = evaluate(args.ckpt, args.num, args.seed, device, args.inception, extra)
            write_json_atomic(out, result)
            print_table(result)
            print(f"metrics written to {out} in {time.perf_counter() - start:.1f} s")
            return 0
    except KeyboardInterrupt:  # Ctrl-C outside training (whose own handler checkpoints first)
        print(f"onestep: interrupted{_interrupted_note(argv)}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - each kind reported as onestep_kernels.errors says
        return report(err)
    return 0


def _interrupted_note(argv: list[str] | None) -> str:
    command = (sys.argv[1:] if argv is None else argv)[:1]
    if command == ["pairs"]:
        return " (the finished shards are kept: run the same command to draw the rest)"
    return ""


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
