"""A run as the commands use it: train one from its config (the networks built and seeded,
a Trainer over them), report it in one line, and load it back for sampling and evaluation.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from onestep_kernels.errors import ArgumentError
from onestep_models import recipes
from onestep_models.train import (
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_weights,
    read_checkpoint_state,
    seed_everything,
)


def train_run(run: dict[str, Any], dataset, num_classes: int, tcfg: TrainConfig, out: Path,
              device: torch.device, progress: bool = True, allow_config_change: bool = False,
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
                      allow_data_change=allow_data_change, compile=compile,
                      to_images=to_images(run, device))
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


def load_run(ckpt: Path, device: torch.device):
    """(EMA recipe module, run config, checkpoint path) from a run or checkpoint directory."""
    if not ckpt.exists():
        raise ArgumentError(f"--ckpt: no such file or directory: {ckpt}")
    checkpoint = latest_checkpoint(ckpt)
    if checkpoint is None:
        raise ArgumentError(f"--ckpt: no checkpoint (checkpoints/step_*/state.json) under {ckpt}")
    run = read_checkpoint_state(checkpoint)["config"]
    model = recipes.build(run, training=False)
    load_weights(model, checkpoint, "ema")
    return model.to(device).eval(), run, checkpoint


def sample_shape(run: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of a run's samples, from its model config (its data need not be at hand)."""
    model = run["model"]
    return model["in_channels"], model["input_size"], model["input_size"]


def to_images(run: dict[str, Any], device: torch.device):
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
