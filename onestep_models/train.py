"""One trainer for every recipe.

A recipe is an `nn.Module` with
  - `loss(x1, y, rng, *extra) -> (loss, logs)`: one step's scalar loss on a (local) batch of
    data x1 with labels y (None when unconditional), drawing all its randomness from `rng`, a
    `BatchRandom` (which knows its step); `extra` are the dataset's further fields (SlimFlow's
    pairs carry their noise); `logs` maps names to detached scalar tensors;
  - `samplers() -> {name: f(x0, y) -> images}`: the ways it generates, used for grids and
    evaluation (for example Direct Models: 1-step w, 1-step and 128-step Euler of v).

The trainer adds what every recipe needs: AdamW, an EMA copy (used for samples and
evaluation), checkpoints that survive a crash, exact resume, seeds, bf16 autocast on GPU,
data parallelism under `torchrun`, a tqdm bar, JSON logs and PNG sample grids.

Reproducibility: `seed_everything(seed)` before building the networks fixes their
initialisation; the batch order and every random draw of step s come from generators seeded
by (seed, s), so a resumed run computes exactly what the uninterrupted run would have. Under
`torchrun` the recipe's loss runs inside `DistributedDataParallel` (`StepLoss` makes the
whole loss computation the module's forward, so a recipe may call its networks several times
per step): DDP makes every replica rank 0's at the start and averages gradients in buckets
that overlap the backward. Every process draws the randomness of the whole global batch and
keeps its own rows, so N processes compute the same update as one process with the same
global batch, up to float summation order, and the replicas stay bit-identical.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from onestep_kernels.errors import ArgumentError, RunStopped, UserError
from onestep_models import step_memory
from onestep_models.data_record import RecordedDataset, record_data
from onestep_models.run_dir import (  # noqa: F401 - re-exported: the trainer's file API
    CHECKPOINT_DIR,
    CheckpointError,
    NonFiniteError,
    RunLock,
    RunLocked,
    append_log,
    latest_checkpoint,
    load_optimizer,
    load_weights,
    read_checkpoint_state,
    remove_temporaries,
    save_checkpoint,
    truncate_log,
    write_json_atomic,
)
from onestep_models.stop_signals import StopSignals

# Settings that may change when a run resumes: they do not alter what a step computes.
FREE_SETTINGS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                 "grid_size", "skip_nonfinite")


class ConfigChanged(ArgumentError):
    """Resuming with settings that change the math, without allow_config_change."""


class StepTooLarge(ArgumentError):
    """A batch whose step cannot fit the device's memory, refused before the step."""


class RunFolderGone(UserError):
    """The run directory was moved or removed under a running run."""


class Interrupted(RunStopped):
    """SIGINT or SIGTERM stopped the run at a step boundary, after a checkpoint (exit 130)."""

    exit_code = 130


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128          # global, over all processes
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0          # linear learning-rate warm-up
    grad_clip: float = 0.0         # max gradient norm; 0 turns clipping off
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0          # 0: a grid only at the end
    grid_size: int = 10            # grid_size x grid_size samples per grid
    amp: bool = True               # bf16 autocast when training on CUDA
    skip_nonfinite: int = 0        # steps with a non-finite loss/gradient tolerated (skipped)

    def __post_init__(self):
        positive = ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                    "grid_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{name}: expected a positive int, got {value!r}")
        for name in ("warmup_steps", "sample_every", "skip_nonfinite"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ArgumentError(f"{name}: expected an int >= 0, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ArgumentError(f"lr: expected a finite value > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ArgumentError(f"{name}: expected a finite value >= 0, got {value}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ArgumentError(f"ema_decay: expected a value in [0, 1), got {self.ema_decay}")


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A host tensor on `device`. To a GPU it goes through pinned memory without waiting, so
    the reproducible draws made on the CPU overlap the previous step's kernels (PyTorch's
    pinned-memory cache keeps the buffer alive until the copy is done)."""
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype) if dtype is not None else t.to(device)


def _step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 7919 + stream) % (2**63)


class BatchRandom:
    """The random draws of one step for a global batch of `size` samples, of which this process
    owns `rows`. Every process draws the same global numbers (on the CPU, from a generator
    seeded by the step) and keeps its rows, so the result does not depend on the split."""

    def __init__(self, seed: int, size: int, rows: slice = slice(None),
                 device: torch.device | str = "cpu", step: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.size, self.rows, self.device = size, rows, torch.device(device)
        self.step = step  # the training step these draws belong to (schedules read it)

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(local B, *shape) standard normal numbers."""
        out = torch.randn((self.size, *shape), generator=self.generator, dtype=dtype)
        return to_device(out[self.rows], self.device)

    def uniform(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        out = torch.rand((self.size, *shape), generator=self.generator, dtype=dtype)
        return to_device(out[self.rows], self.device)

    def drop_labels(self, y: Tensor | None, p: float, null_class: int) -> Tensor | None:
        """Labels replaced by the null class with probability p (class dropout). The draw is
        made even when y is None so that later draws do not depend on conditioning."""
        drop = self.uniform() < p
        return None if y is None else torch.where(drop, null_class, y)


class EpochSampler:
    """Batch indices for step s: consecutive slices of an endless sequence of permutations of
    the dataset, permutation e seeded by (seed, e). Stateless, so resuming is exact."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ArgumentError("dataset: it is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: tuple[int, Tensor] | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_step_seed(self.seed, epoch, 1))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def indices(self, step: int) -> Tensor:
        start = step * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs, offsets = positions // self.n, positions % self.n
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():  # one or two epochs per batch
            rows = epochs == epoch
            out[rows] = self._permutation(epoch)[offsets[rows]]
        return out


def fetch(dataset: Dataset, idx: Tensor) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """(images, labels or None, further fields) for dataset indices; TensorDatasets are
    indexed in one go. Further fields (a pair's noise, for SlimFlow) go to the recipe's loss."""
    if isinstance(dataset, TensorDataset):
        items = [t[idx] for t in dataset.tensors]
    else:
        pairs = [dataset[int(i)] for i in idx]
        items = [torch.stack([torch.as_tensor(p[k]) for p in pairs]) for k in range(len(pairs[0]))]
    return items[0], (items[1] if len(items) > 1 else None), items[2:]


# ---------------------------------------------------------------------------- distributed

def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes in the environment (nccl on GPU, gloo
    on CPU), and return the device this process trains on: under torchrun, "cuda" without an
    index means this process's own GPU, cuda:LOCAL_RANK (made the current device), since
    every process would otherwise take GPU 0 and nccl refuses two ranks on one GPU. Outside
    torchrun: nothing joined, `device` as given."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def seed_everything(seed: int) -> None:
    """Seed every generator that initialisation may draw from (Python, NumPy, torch on the CPU
    and every GPU), so that networks built next are the same in every run with this seed."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


class StepLoss(nn.Module):
    """A recipe's loss as a module forward, for DistributedDataParallel: one forward per step,
    however many times the recipe calls its networks inside it."""

    def __init__(self, recipe: nn.Module):
        super().__init__()
        self.recipe = recipe

    def forward(self, x1: Tensor, y: Tensor | None, rng: BatchRandom, *extra: Tensor):
        return self.recipe.loss(x1, y, rng, *extra)


# ---------------------------------------------------------------------------- images

def save_grid(images: Tensor, path: str | Path, nrow: int) -> None:
    """Images in [-1, 1], (B, C, H, W) with C in {1, 3}, tiled nrow per row into a PNG (each
    image upscaled to at least 32 pixels so that 8x8 digits are visible)."""
    import numpy as np
    from einops import rearrange
    from PIL import Image

    images = images.detach().float().cpu().clamp(-1, 1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ArgumentError(f"images: expected (B, 1 or 3, H, W), got {tuple(images.shape)}")
    scale = max(1, -(-32 // images.shape[-1]))
    images = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    b = images.shape[0]
    rows = -(-b // nrow)
    pad = rows * nrow - b
    if pad:
        images = torch.cat([images, -torch.ones(pad, *images.shape[1:])])
    images = torch.nn.functional.pad(images, (1, 1, 1, 1), value=1.0)
    grid = rearrange(images, "(r n) c h w -> (r h) (n w) c", n=nrow)
    pixels = ((grid + 1) * 127.5).round().to(torch.uint8).numpy()
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    Image.fromarray(np.ascontiguousarray(pixels.squeeze(-1) if mode == "L" else pixels),
                    mode=mode).save(path)


def grid_inputs(shape: tuple[int, ...], num_classes: int, n: int, seed: int,
                device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Fixed noise (and labels 0, 1, 2, ... cycling) for sample grids and evaluation, drawn
    on `device` (no host-to-device copy; the noise depends on the device's generator)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn((n, *shape), generator=g, device=device)
    y = torch.arange(n, device=device) % num_classes if num_classes > 0 else None
    return x0, y


# ---------------------------------------------------------------------------- the loop

def _ema_pairs(model: nn.Module, ema: nn.Module) -> tuple[tuple[list[Tensor], list[Tensor]],
                                                          tuple[list[Tensor], list[Tensor]]]:
    """(EMA, model) tensors the EMA follows: the parameters being trained, averaged, and the
    persistent buffers (state such as normalisation statistics), copied. Frozen parameters
    (SlimFlow's guide) and constant buffers (LPIPS' VGG, held non-persistent) are left as
    the copy made them: averaging a tensor that never changes rewrites it unchanged, and
    on a GPU each such tensor costs a read and a write every step."""
    persistent = set(model.state_dict(keep_vars=True))
    params = [(e, p) for p, e in zip(model.parameters(), ema.parameters()) if p.requires_grad]
    buffers = [(e, b) for (name, b), e in zip(model.named_buffers(), ema.buffers())
               if name in persistent]
    return tuple(([e for e, _ in pairs], [m for _, m in pairs]) for pairs in (params, buffers))


class Trainer:
    """Trains `model` (a recipe) on `dataset`, writing into `out_dir` (see
    onestep_models.run_dir): checkpoints/, log.jsonl (one line per `log_every` steps),
    grid_<sampler>.png (`to_images` turns samples into images in [-1, 1] first: a VAE's
    decoder for runs on latents; by default the samples are the images).

    Faults it survives: a second writer (the run directory's lock: RunLocked), a crash at any
    moment (whole checkpoints only; resuming removes half-written ones and the log lines after
    the checkpoint, and redoes the lost steps bit-identically), SIGINT/SIGTERM (stops at the
    next step boundary, checkpoints, raises Interrupted), a non-finite loss or gradient (the
    step is not applied; after `skip_nonfinite` of them NonFiniteError names the step, and no
    checkpoint with a non-finite tensor is ever written), damaged checkpoints (skipped for the
    newest intact one), a resume whose settings would change the math (ConfigChanged,
    unless `allow_config_change`, which logs the change), and a resume on other data than the
    run recorded (a RecordedDataset's fingerprint, kept in RUN/data.json: DataChanged, unless
    `allow_data_change`, which logs the change)."""

    def __init__(self, model: nn.Module, dataset: Dataset, config: TrainConfig,
                 out_dir: str | Path, run_config: dict[str, Any] | None = None,
                 num_classes: int = 0, device: str | torch.device | None = None,
                 progress: bool = True, allow_config_change: bool = False,
                 allow_data_change: bool = False, compile: bool = False,
                 to_images: Callable[[Tensor], Tensor] | None = None):
        self.device = init_distributed(
            torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        self.rank, self.world_size = world()
        if config.batch_size % self.world_size:
            raise ArgumentError(f"batch_size: {config.batch_size} does not split evenly over "
                                f"{self.world_size} processes")
        self.config, self.out_dir = config, Path(out_dir)
        self.run_config = dict(run_config or {})
        self.run_config["train"] = dataclasses.asdict(config)
        self.num_classes, self.progress = num_classes, progress
        self.allow_config_change, self.allow_data_change = allow_config_change, allow_data_change
        self.dataset = dataset
        self.to_images = to_images
        self.model = model.to(self.device)
        self.step_loss: nn.Module = StepLoss(self.model)
        if self.world_size > 1:  # broadcasts rank 0's parameters and buffers: equal replicas
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_loss = DistributedDataParallel(self.step_loss, device_ids=ids)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self._ema_params, self._ema_buffers = _ema_pairs(self.model, self.ema)
        if compile:  # torch.compile each network the recipe trains (in place: same state_dict;
            for child in self.model.children():  # after the EMA copy, which stays eager)
                child.compile()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # (on a GPU PyTorch's fused AdamW: one kernel per group of tensors, step counts kept on
        # the device; elsewhere its default, which the CPU runs and their tests were made with)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr,
                                           weight_decay=config.weight_decay,
                                           fused=True if self.device.type == "cuda" else None)
        self.sampler = EpochSampler(len(dataset), config.batch_size, config.seed)
        self.step = 0
        self.seconds = 0.0   # training time over the run's life, resumes included
        self.skipped = 0     # non-finite steps skipped in this process
        self.start_step = 0  # where this process's fit() began
        self._stop_signal: int | None = None
        self._stop_agreed = False  # a signal seen by any process, as of the last step's sync
        self._doing = "before the first step"  # what a second signal interrupts, for its line

    # -- state
    def config_changes(self, saved: dict[str, Any]) -> list[str]:
        """'key: old -> new' for each saved setting this run changes that alters the math."""
        current = json_round_trip(self.run_config)
        changes = []
        for key in sorted(set(saved) | set(current)):
            if key == "train":
                old, new = saved.get("train", {}), current["train"]
                for name in sorted(set(old) | set(new)):
                    if name not in FREE_SETTINGS and old.get(name) != new.get(name):
                        changes.append(f"train.{name}: {old.get(name)!r} -> {new.get(name)!r}")
            elif saved.get(key) != current.get(key):
                changes.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
        return changes

    def resume(self) -> bool:
        """Load the newest intact checkpoint in out_dir, if any; True when one was loaded."""
        checkpoint = latest_checkpoint(self.out_dir)
        if checkpoint is None:
            return False
        state = read_checkpoint_state(checkpoint)
        changes = self.config_changes(state["config"])
        if changes and not self.allow_config_change:
            raise ConfigChanged(
                f"--out: {self.out_dir} holds a run with other settings ({'; '.join(changes)});"
                " resume with the same settings, pass --allow-config-change to change them, "
                "or use a new directory")
        data_changes = self._record_data(resuming=True)
        load_weights(self.model, checkpoint, "model")
        load_weights(self.ema, checkpoint, "ema")
        load_optimizer(self.optimizer, checkpoint, self.device)
        self.step = state["step"]
        self.seconds = float(state.get("seconds", 0.0))
        if changes and self.rank == 0:
            append_log(self.out_dir / "log.jsonl",
                       {"step": self.step, "event": "config_change", "changes": changes})
            print(f"onestep: resuming step {self.step} with changed settings: "
                  f"{'; '.join(changes)}", file=sys.stderr)
        if data_changes and self.rank == 0:
            append_log(self.out_dir / "log.jsonl",
                       {"step": self.step, "event": "data_change", "changes": data_changes})
            print(f"onestep: resuming step {self.step} on changed data: "
                  f"{'; '.join(data_changes)}", file=sys.stderr)
        return True

    def _record_data(self, resuming: bool) -> list[str]:
        """Record the dataset's fingerprint in the run directory, or compare it with the
        recorded one when resuming (see onestep_models.data_record); the changes allowed."""
        if not isinstance(self.dataset, RecordedDataset):
            return []  # (a dataset of the caller's own: nothing to record)
        return record_data(self.out_dir, self.dataset.fingerprint, resuming=resuming,
                           allow_change=self.allow_data_change, writer=self.rank == 0)

    def _lr(self, step: int) -> float:
        warm = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warm) if warm else self.config.lr

    def _rows(self) -> slice:
        local = self.config.batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    # -- memory
    def _probe_loss(self, n: int):
        """The recipe's loss on the dataset's first n samples, as a step computes it (autocast
        included; not through DDP, whose buckets would wait for the other processes)."""
        x1, y, extra = self._batch(torch.arange(n) % len(self.dataset))
        rng = BatchRandom(_step_seed(self.config.seed, self.step, 2), n, slice(None),
                          self.device, self.step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._autocast):
            return self.model.loss(x1, y, rng, *extra)[0]

    def _batch(self, idx: Tensor) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """The dataset's rows `idx` on the device: (samples, labels or None, further fields)."""
        x1, y, extra = fetch(self.dataset, idx)
        x1 = to_device(x1, self.device, torch.float32)
        y = to_device(y, self.device) if y is not None and self.num_classes > 0 else None
        return x1, y, [to_device(t, self.device, torch.float32) for t in extra]

    @property
    def _autocast(self) -> bool:
        """bf16 autocast around the loss: on CUDA, unless TrainConfig.amp is off."""
        return self.config.amp and self.device.type == "cuda"

    def check_step_memory(self) -> int | None:
        """Refuse, before the first step, a batch whose step cannot fit the device's free
        memory (StepTooLarge naming --batch-size, with the estimate: see
        onestep_models.step_memory); returns the estimate in bytes (None for a batch no larger
        than the probes). The probes leave no trace: the global RNG is seeded after them."""
        local = self.config.batch_size // self.world_size
        if local <= max(step_memory.PROBES):
            return None
        self.model.train()
        with torch.compiler.set_stance("force_eager"):  # (no compilation for the probes' shapes)
            per_sample, per_step = step_memory.activation_bytes(
                self._probe_loss, local, list(self.model.parameters()))
        states = step_memory.optimizer_state_bytes(self.params, self.optimizer)
        estimate = per_sample * local + per_step + states
        free = step_memory.available_bytes(self.device)
        if free is not None and estimate > free:
            fmt = step_memory.format_bytes
            each, more = (" per process", " or spread it over more processes") \
                if self.world_size > 1 else ("", "")
            raise StepTooLarge(
                f"--batch-size: a step of {local} samples{each} needs at least {fmt(estimate)} "
                f"({fmt(per_sample)} a sample for the backward, {fmt(per_step + states)} for "
                f"the step's fixed part, gradients and optimizer state), more than the "
                f"{fmt(free)} free on {self.device}; lower --batch-size{more}")
        return estimate

    # -- one step
    def train_step(self) -> dict[str, float]:
        """One optimisation step. A step whose loss or gradient is not finite (on any
        process) is not applied; past `skip_nonfinite` of them, NonFiniteError."""
        cfg, step = self.config, self.step
        self.model.train()
        x1, y, extra = self._batch(self.sampler.indices(step)[self._rows()])
        rng = BatchRandom(_step_seed(cfg.seed, step, 2), cfg.batch_size, self._rows(),
                          self.device, step)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._autocast):
            loss, logs = self.step_loss(x1, y, rng, *extra)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged over the processes
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # One host sync for the loss, the norm, the recipe's logs and two flags that every
        # process agrees on (one collective, on the loss's device, which nccl needs): a
        # non-finite loss anywhere, a stop signal anywhere. All before the optimiser's step is
        # queued: read after it, a value would wait for that step and the EMA to finish, and
        # the next batch could not be prepared and launched while the device runs them.
        local_bad = (~torch.isfinite(loss.detach())).float()
        flags = torch.stack([local_bad, local_bad.new_full((), self._stop_signal is not None)])
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        on_device = [k for k, v in logs.items()
                     if isinstance(v, Tensor) and v.device == loss.device]
        values = torch.stack([loss.detach().float(), norm.float(), *flags,
                              *(logs[k].detach().float().reshape(()) for k in on_device)]).tolist()
        loss_value, norm_value, bad, stop = values[:4]
        self._stop_agreed = bool(stop)
        read = dict(zip(on_device, values[4:]))
        logged = {k: read[k] if k in read else float(v) for k, v in logs.items()}
        self.step += 1
        if bad or not math.isfinite(norm_value):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            if self.skipped > cfg.skip_nonfinite:
                raise NonFiniteError(
                    f"step {self.step}: the loss ({loss_value}) or gradient norm ({norm_value})"
                    " is not finite; the step was not applied and the last checkpoint is "
                    "intact (lower --lr, or tolerate a few with --skip-nonfinite N)")
            return {"loss": loss_value, "grad_norm": norm_value, "skipped": self.skipped}
        self.optimizer.step()
        with torch.no_grad():
            # EMA with the usual warm-up: decay min(d, (1 + s) / (10 + s)) so that early
            # averages are not dominated by the random initialisation.
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            # (multi-tensor kernels: a DiT-XL/2 has hundreds of tensors, one launch each before)
            averaged, trained = self._ema_params
            if averaged:
                torch._foreach_lerp_(averaged, trained, 1 - decay)
            if self._ema_buffers[0]:
                torch._foreach_copy_(*self._ema_buffers)
        return {"loss": loss_value, "grad_norm": norm_value, **logged}

    # -- outputs
    def write_grids(self, tag: str = "") -> list[Path]:
        if self.rank != 0:
            return []
        cfg = self.config
        shape = tuple(self.dataset[0][0].shape)
        x0, y = grid_inputs(shape, self.num_classes, cfg.grid_size ** 2, cfg.seed + 1,
                            self.device)
        paths = []
        for name, sample in self.ema.samplers().items():
            path = self.out_dir / f"grid_{name}{tag}.png"
            tmp = path.with_name(f".tmp_{path.name}")
            images = sample(x0, y)
            if self.to_images is not None:
                images = self.to_images(images)
            save_grid(images, tmp, cfg.grid_size)
            os.replace(tmp, path)
            paths.append(path)
        return paths

    def checkpoint(self) -> Path | None:
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.out_dir, self.step, self.model, self.ema,
                                   self.optimizer, self.run_config,
                                   self.config.keep_checkpoints, self.seconds)
        if self.world_size > 1:
            dist.barrier()
        return path

    # -- the run
    def _report_first_step(self, seconds: float, estimate: int | None) -> None:
        """One line on stdout, beside the step lines: the first step's time and the peak
        memory so far."""
        peak = step_memory.peak_bytes(self.device)
        fmt = step_memory.format_bytes
        what = "allocated" if self.device.type == "cuda" else "resident (the process)"
        print(f"first step {seconds:.2f} s"
              + ("" if peak is None else f", peak memory {fmt(peak)} {what}")
              + ("" if estimate is None else f", estimated at least {fmt(estimate)}"),
              flush=True)

    def _on_signal(self, signum: int) -> None:
        self._stop_signal = signum

    def _stopped_at_once(self) -> str:
        """The line for a second signal, which ends the process inside its step."""
        last = latest_checkpoint(self.out_dir, verify=False)
        return (f"stopped at once, {self._doing}; run the same command to resume from "
                f"{'the start' if last is None else last.name}")

    def fit(self, resume: bool = True) -> dict[str, float]:
        """Train to `config.steps`, resuming from out_dir's newest intact checkpoint if
        asked; see the class docstring for the faults it handles."""
        lock = RunLock(self.out_dir).acquire() if self.rank == 0 else None
        try:
            with StopSignals(self._on_signal, self._stopped_at_once):
                return self._fit(resume)
        except FileNotFoundError as err:
            if self.out_dir.is_dir():
                raise
            raise RunFolderGone(
                f"--out: {self.out_dir} was moved or removed while the run was writing it "
                f"({err.strerror}: {err.filename}); its checkpoints went with it: run the same "
                "command with --out at its new place to resume") from None
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.config
        log_path = self.out_dir / "log.jsonl"
        if self.rank == 0:
            remove_temporaries(self.out_dir)  # left by a crash mid-checkpoint
        if not (resume and self.resume()):
            self._record_data(resuming=False)
        if self.rank == 0:
            truncate_log(log_path, self.step)  # steps after the checkpoint are redone
        self.start_step = self.step
        if self.step >= cfg.steps:
            return {}  # a finished run: nothing to redo, its grids stay as they are
        estimate = self.check_step_memory()
        torch.manual_seed(_step_seed(cfg.seed, self.step, 3))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # a bar for a terminal; plain lines for files and pipes (and with progress=False)
        use_bar = self.progress and self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not use_bar, desc="train",
                   dynamic_ncols=True)
        logs: dict[str, float] = {}
        start, offset = time.perf_counter(), self.seconds
        while self.step < cfg.steps:
            self._doing = f"inside step {self.step + 1}"
            logs = self.train_step()
            self.seconds = offset + time.perf_counter() - start
            if self.step == self.start_step + 1 and self.rank == 0:
                self._report_first_step(self.seconds - offset, estimate)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                logs.update(step=self.step, lr=self._lr(self.step - 1),
                            seconds=round(self.seconds, 2))
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                if self.rank == 0:
                    append_log(log_path, logs)
                    if not use_bar:
                        print(f"step {self.step}/{cfg.steps}  loss {logs['loss']:.4g}  "
                              f"{self.seconds:.1f} s", flush=True)
            # alone: at once; among processes: as every one of them read it at the step's sync
            # (seen by one after that sync, it stops them all after the next step)
            stop = self._stop_signal is not None if self.world_size == 1 else self._stop_agreed
            if stop or self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self._doing = f"while writing step {self.step}'s checkpoint"
                self.checkpoint()
            if stop:
                bar.close()
                raise Interrupted(f"interrupted at step {self.step}; run the same command to "
                                  "resume")
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self._doing = "while writing sample grids"
                self.write_grids(f"_step{self.step:08d}")
        bar.close()
        self._doing = "while writing the final sample grids"
        self.write_grids()
        return logs


def json_round_trip(value: Any) -> Any:
    """value as it reads back from JSON (tuples become lists), for comparisons."""
    import json

    return json.loads(json.dumps(value))
