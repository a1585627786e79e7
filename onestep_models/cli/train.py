"""`onestep train RECIPE`: the run config from the arguments, then the training (SlimFlow's
pipeline for `slimflow`: onestep_models.slimflow_run)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from onestep_models import recipes
from onestep_models.cli.arguments import UsageError, check_output_dir
from onestep_models.runs import report_training, train_run
from onestep_models.slimflow_run import train_slimflow
from onestep_models.train import TrainConfig


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                       grad_clip=args.grad_clip, ema_decay=args.ema, seed=args.seed,
                       checkpoint_every=args.checkpoint_every,
                       keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
                       sample_every=args.sample_every, grid_size=args.grid_size,
                       skip_nonfinite=args.skip_nonfinite)


def training_options(args) -> dict:
    """train_run's keywords from the arguments every training command has."""
    return {"progress": not args.no_progress, "allow_config_change": args.allow_config_change,
            "allow_data_change": args.allow_data_change,
            "compile": getattr(args, "compile", False)}


def run(args, device: torch.device) -> int:
    check_output_dir(args.out, "--out")
    tcfg = train_config(args)
    if args.recipe == "slimflow":
        return slimflow(args, tcfg, device)
    made = slt_run_config(args) if args.recipe == "slt" else run_config(args, args.recipe)
    run_cfg, dataset, num_classes = made
    start = time.perf_counter()
    trainer = train_run(run_cfg, dataset, num_classes, tcfg, args.out, device,
                        **training_options(args))
    report_training(trainer, tcfg, args.out, time.perf_counter() - start)
    return 0


def slimflow(args, tcfg: TrainConfig, device: torch.device) -> int:
    """`train slimflow`: the arguments that cannot apply refused, then both stages."""
    weights = None
    if args.distance == "lpips":
        for flag, path in (("--vgg", args.vgg), ("--lpips", args.lpips)):
            if path is None or not path.is_file():
                raise UsageError(f"{flag}: --distance lpips needs the local weights "
                                 f"file, got {path}")
        weights = {"vgg": str(args.vgg.resolve()), "lins": str(args.lpips.resolve())}
    if args.pairs is not None:
        for flag, value in (("--num-pairs", args.num_pairs), ("--heun-steps", args.heun_steps)):
            if value is not None:
                raise UsageError(f"{flag}: the pairs are --pairs {args.pairs}, drawn already "
                                 f"with their own settings; leave {flag} out (it applies where "
                                 "train slimflow draws them)")
    train_slimflow(args.out, tcfg, device, teacher=args.teacher, pairs=args.pairs,
                   num_pairs=args.num_pairs or 10_000, heun_steps=args.heun_steps or 32,
                   stage=args.stage, student=args.model or "slim-32",
                   anneal_steps=args.anneal_steps, schedule=args.anneal_schedule,
                   hflip=args.hflip, guidance=not args.no_guidance,
                   distill_steps=args.distill_steps, distance=args.distance,
                   lpips_weights=weights, **training_options(args))
    return 0


def run_config(args, recipe: str):
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


def slt_run_config(args):
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
