"""SlimFlow as the commands run it: a teacher's pairs drawn into a folder (one writer, shared
by the processes of one torchrun), then the student's two stages, Annealing Reflow and
Flow-Guided Distillation, each a run of its own (onestep_models.slimflow has the method).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from onestep_kernels.errors import ArgumentError
from onestep_models import recipes
from onestep_models.run_dir import RunLock, load_into, load_tensors
from onestep_models.runs import report_training, sample_shape, train_run
from onestep_models.train import (
    TrainConfig,
    init_distributed,
    latest_checkpoint,
    read_checkpoint_state,
    world,
)


def draw_pairs(teacher_ckpt: Path, out: Path, num: int, *, heun_steps: int, seed: int,
               device: torch.device, shard_size: int = 1024, solver: str = "heun") -> None:
    """The teacher run's EMA velocity integrated from seeded noise into `out`'s pair shards
    (onestep_models.slimflow.generate_pairs), a line per shard and a closing line with the
    pairs per second; the manifest records the teacher's checkpoint and data."""
    # under torchrun the processes share the shards, each on its own GPU, then wait for all
    device = init_distributed(device)
    rank, world_size = world()
    teacher, teacher_run, checkpoint = recipes.load_teacher(teacher_ckpt, device)
    shape = sample_shape(teacher_run)
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


def train_slimflow(out: Path, tcfg: TrainConfig, device: torch.device, *,
                   teacher: Path | None = None, pairs: Path | None = None, num_pairs: int,
                   heun_steps: int, stage: str, student: str, anneal_steps: int, schedule: str,
                   hflip: bool, guidance: bool, distill_steps: int,
                   distance: str = "pseudo_huber", lpips_weights: dict[str, str] | None = None,
                   **training) -> dict[str, Path]:
    """SlimFlow's stages into `out`: pairs/ (drawn from `teacher`, unless `pairs` names them),
    then reflow/ (Annealing Reflow, tcfg.steps) and distill/ (Flow-Guided Distillation,
    `distill_steps`), each a run directory of its own; returns them. `training`: train_run's
    keywords (progress, allow_config_change, allow_data_change, compile)."""
    dirs = {"pairs": pairs or out / "pairs", "reflow": out / "reflow", "distill": out / "distill"}
    if pairs is None:
        if teacher is None:
            raise ArgumentError("--teacher: required to draw the pairs (or give --pairs)")
        draw_pairs(teacher, dirs["pairs"], num_pairs, heun_steps=heun_steps, seed=tcfg.seed,
                   device=device)
    data = {"kind": "pairs", "path": str(Path(dirs["pairs"]).resolve())}
    if stage in ("both", "reflow"):
        run, dataset, num_classes = recipes.run_config(
            "slimflow_reflow", data, student, True,
            {"anneal_steps": anneal_steps, "schedule": schedule, "hflip": hflip})
        start = time.perf_counter()
        trainer = train_run(run, dataset, num_classes, tcfg, dirs["reflow"], device, **training)
        report_training(trainer, tcfg, dirs["reflow"], time.perf_counter() - start)
    if stage in ("both", "distill"):
        init_from = latest_checkpoint(dirs["reflow"])
        if init_from is None:
            raise ArgumentError(f"--stage distill: no Annealing Reflow checkpoint in "
                                f"{dirs['reflow']}")
        reflow_run = read_checkpoint_state(init_from)["config"]
        run, dataset, num_classes = recipes.run_config(
            "slimflow_distill", data, student, True,
            {"distance": distance, "guidance": guidance, "init": str(init_from.resolve()),
             **({"lpips_weights": lpips_weights} if distance == "lpips" else {})})
        run["model"] = reflow_run["model"]  # the student stage 1 trained

        def start_from_stage_one(recipe) -> None:
            for which, net in (("model", recipe.v), ("ema", recipe.guide)):
                path = init_from / f"{which}.safetensors"
                tensors = {k[2:]: v for k, v in load_tensors(path).items() if k.startswith("v.")}
                load_into(net, tensors, path)

        distill = dataclasses.replace(tcfg, steps=distill_steps,
                                      checkpoint_every=min(tcfg.checkpoint_every, distill_steps))
        start = time.perf_counter()
        trainer = train_run(run, dataset, num_classes, distill, dirs["distill"], device,
                            init=start_from_stage_one, **training)
        report_training(trainer, distill, dirs["distill"], time.perf_counter() - start)
    return dirs
