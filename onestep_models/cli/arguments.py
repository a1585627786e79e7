"""The `onestep` command's arguments: the parser of every command, the argument types (finite
numbers in range, seeds), and the checks made before any work (the device, the outputs).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from onestep_kernels.errors import UserError
from onestep_models import recipes, screening_run
from onestep_models.cli.demo import DEMO
from onestep_models.run_dir import lock_holder


class UsageError(UserError):
    """A problem with what the user asked for: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


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
                   help="K, the applications of the one block (default: the teacher's depth; "
                        "a quarter of it for the slt-screen sizes)")
    g.add_argument("--patches", type=_positive(int), default=None,
                   help="P, the depth patches matched against the teacher (and fused by the "
                        "head; default: 4, or K where K < 4)")
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


def screen_pieces(args, device: torch.device):
    """The screened sampler's pieces for --screen, or None; --slt alone is a usage error."""
    if args.screen is None:
        if args.slt is not None:
            raise UsageError("--slt: goes with --screen N (how many noises to screen)")
        return None
    return screening_run.load_screening(args.ckpt, args.slt, device, args.scorer,
                                        cuda_graphs=not getattr(args, "no_cuda_graph", False))


def device_from(name: str | None) -> torch.device:
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
