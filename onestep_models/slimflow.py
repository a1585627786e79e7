"""SlimFlow (Zhu, Liu and Liu, ECCV 2024): small one-step students of a rectified-flow teacher,
in two stages after the teacher's pairs are drawn.

1. Pairs: z0 ~ N(0, I) pushed through the teacher's ODE to x1 (`generate_pairs`, stored in
   shards that a killed run resumes).
2. Annealing Reflow (`AnnealingReflow`): a smaller student trained from scratch by flow
   matching on the pairs, with the pair's noise blended with fresh noise by a weight β that
   anneals from 1 (plain flow matching, as if unpaired) to 0 (reflow on the pairs):
   z̃0 = √(1 − β²)·z0 + β·ξ, t ~ U[ε, 1], loss ‖v(x_t, t) − (x1 − z̃0)‖².
3. Flow-Guided Distillation (`FlowGuidedDistillation`): the student, and a frozen copy of the
   stage-1 student (its EMA weights) as the guide, both start from stage 1's checkpoint:
   loss = D(z0 + v(z0, ε), x1) + D(z′ + v(z′, ε), x̂1), where z′ is fresh noise,
   t′ ~ U[0.2, 0.8], x_t′ = z′ + t′·sg[v(z′, ε)] and x̂1 = x_t′ + (1 − t′)·v_guide(x_t′, t′)
   (no gradient). D is pseudo-Huber (improved consistency training's) or LPIPS(VGG) when its
   weights are given as local files.

Time convention: the paper builds on Rectified Flow, whose code interpolates
x_t = t·x1 + (1 − t)·z0 with z0 the noise at t = 0 and trains v toward x1 − z0; the official
SlimFlow code (yuanzhi-zhu/SlimFlow, reflow/reflow.py) does the same (t in [ε, 1], the network
called at 999·t) and samples in one step as x1 = z0 + v(z0, ε). That is onestep's convention
(onestep_models.flow), so nothing is converted: our FlowDiT takes t in [0, 1] and scales it
to 0..1000 itself. The official guidance term is its `teacher_loss_new`: the student's own
velocity at z′ (detached) places x_t′, the guide completes the path from there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from onestep_kernels.errors import ArgumentError, DataError
from onestep_models import flow
from onestep_models.run_dir import WritingInto, file_sha256, write_json_atomic

SCHEDULES = ("linear", "exp", "cos")
DISTANCES = ("pseudo_huber", "lpips")
EPS = 1e-3  # the smallest time: one-step sampling evaluates v(z0, EPS)


def annealing_beta(step: int, K: int, schedule: str = "linear") -> float:
    """β at training step `step` of an annealing over K steps: from 1 at step 0 towards 0;
    linear 1 − min(1, k/K) (the paper's), exp e^(−k/K), cos (1 + cos(π·min(1, k/K))) / 2."""
    if schedule not in SCHEDULES:
        raise ArgumentError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if K < 0:
        raise ArgumentError(f"K: expected >= 0 annealing steps, got {K}")
    if K == 0:
        return 0.0
    progress = min(1.0, step / K)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "exp":
        return math.exp(-step / K)
    return (1.0 + math.cos(math.pi * progress)) / 2.0


def anneal_noise(z0: Tensor, xi: Tensor, beta: float) -> Tensor:
    """√(1 − β²)·z0 + β·ξ: still N(0, I) when z0 and ξ are, and the pair's own noise at β = 0."""
    return math.sqrt(max(0.0, 1.0 - beta * beta)) * z0 + beta * xi


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample √(‖a − b‖² + c²) − c with c = 0.00054·√d (d the sample's size), improved
    consistency training's distance; (B,)."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d)
    sq = (a - b).float().square().flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c


def one_step(v: Callable, z0: Tensor, y: Tensor | None) -> Tensor:
    """x1 = z0 + v(z0, ε)."""
    return z0 + v(z0, torch.full((z0.shape[0],), EPS, dtype=z0.dtype, device=z0.device), y)


@torch.no_grad()
def guidance_target(guide: Callable, z: Tensor, v_z: Tensor, t: Tensor,
                    y: Tensor | None) -> Tensor:
    """x̂1 = x_t + (1 − t)·guide(x_t, t) at x_t = z + t·v_z (v_z the student's velocity at z,
    taken as a constant): where the guide flow lands from the student's point at time t."""
    tb = flow._bcast(t, z)
    x_t = z + tb * v_z
    return x_t + (1 - tb) * guide(x_t, t, y)


def _flip(x: Tensor, mask: Tensor) -> Tensor:
    """x with the samples where mask is True flipped left-right."""
    return torch.where(flow._bcast(mask, x).bool(), x.flip(-1), x)


class AnnealingReflow(nn.Module):
    """Stage 1, a recipe for onestep_models.train on a pairs dataset (x1, y, z0): the student
    v trained by flow matching on annealed pairs (see the module docstring). `anneal_steps`
    K and `schedule` give β(step); `hflip` flips a pair (both sides together) with
    probability 1/2, for images whose mirror image is as likely."""

    def __init__(self, v: nn.Module, num_classes: int = 0, anneal_steps: int = 1000,
                 schedule: str = "linear", hflip: bool = False):
        super().__init__()
        annealing_beta(0, anneal_steps, schedule)  # validates
        self.v, self.num_classes = v, num_classes
        self.anneal_steps, self.schedule, self.hflip = anneal_steps, schedule, hflip

    def loss(self, x1: Tensor, y: Tensor | None, rng, z0: Tensor):
        beta = annealing_beta(rng.step, self.anneal_steps, self.schedule)
        xi = rng.normal(*x1.shape[1:]).to(x1.dtype)
        t = EPS + (1 - EPS) * rng.uniform().to(x1.dtype)
        flip = rng.uniform() < 0.5  # drawn every step, so later draws do not depend on hflip
        if self.hflip:
            x1, z0 = _flip(x1, flip), _flip(z0, flip)
        z = anneal_noise(z0, xi, beta)
        loss = flow.cfm_loss(self.v, x1, y, x0=z, t=t)
        return loss, {"beta": torch.tensor(beta)}

    def samplers(self) -> dict[str, Callable]:
        return {"slimflow_1step": lambda z0, y: one_step(self.v, z0, y),
                "flow_euler_128step": lambda z0, y: flow.euler(self.v, z0, 128, y)}


def _hold_as_constant(module: nn.Module) -> None:
    """A fixed function's weights (LPIPS' VGG) as non-persistent buffers: `.to()` moves them
    with the recipe, but they are not the recipe's state: not in its checkpoints (VGG16's
    59 MB, twice, beside a student of a few hundred kB) and not among its parameters (the
    optimiser and the EMA average none of them); they come from their own files when the
    recipe is built."""
    for sub in module.modules():
        for name, tensor in list(sub._parameters.items()) + list(sub._buffers.items()):
            sub._parameters.pop(name, None)
            sub._buffers.pop(name, None)
            sub.register_buffer(name, None if tensor is None else tensor.detach(),
                                persistent=False)


class FlowGuidedDistillation(nn.Module):
    """Stage 2, a recipe on the pairs dataset: the student v and a frozen guide (both from
    stage 1; see the module docstring). `distance`: "pseudo_huber", or an LPIPS module (any
    callable (a, b) -> per-sample distances) for "lpips". `guidance=False` keeps only the
    first term (the ablation)."""

    def __init__(self, v: nn.Module, guide: nn.Module, num_classes: int = 0,
                 distance: str | Callable = "pseudo_huber", guidance: bool = True,
                 t_range: tuple[float, float] = (0.2, 0.8)):
        super().__init__()
        self.v, self.num_classes, self.guidance = v, num_classes, guidance
        self.guide = guide.requires_grad_(False).eval()
        if isinstance(distance, str):
            if distance != "pseudo_huber":
                raise ArgumentError("distance: 'lpips' needs an LPIPS module (see lpips.py); "
                                    f"expected 'pseudo_huber' or a module, got {distance!r}")
            distance = pseudo_huber
        elif isinstance(distance, nn.Module):
            _hold_as_constant(distance)
        self.distance = distance
        lo, hi = t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ArgumentError(f"t_range: expected 0 <= low <= high <= 1, got {t_range}")
        self.t_range = (lo, hi)

    def train(self, mode: bool = True):
        super().train(mode)
        self.guide.eval()  # the guide stays frozen
        return self

    def loss(self, x1: Tensor, y: Tensor | None, rng, z0: Tensor):
        eps = torch.full((x1.shape[0],), EPS, dtype=x1.dtype, device=x1.device)
        pair_term = self.distance(z0 + self.v(z0, eps, y), x1).mean()
        z = rng.normal(*x1.shape[1:]).to(x1.dtype)
        lo, hi = self.t_range
        t = lo + (hi - lo) * rng.uniform().to(x1.dtype)
        logs = {"pair": pair_term.detach()}
        if not self.guidance:
            return pair_term, logs
        v_z = self.v(z, eps, y)
        target = guidance_target(self.guide, z, v_z.detach(), t, y)
        guided_term = self.distance(z + v_z, target).mean()
        logs["guided"] = guided_term.detach()
        return pair_term + guided_term, logs

    def samplers(self) -> dict[str, Callable]:
        return {"slimflow_1step": lambda z0, y: one_step(self.v, z0, y)}


# ---------------------------------------------------------------------------- pairs

PAIRS_MANIFEST = "pairs.json"


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}"


SHARD_FILES = ("z0", "x1", "y")
SHARD_MANIFEST = "shard.json"  # each file's shape, dtype, size and sha256, written with it


def _describe_shard(directory: Path) -> dict:
    """What a shard's manifest records of its files."""
    described = {}
    for name in SHARD_FILES:
        path = directory / f"{name}.npy"
        array = np.load(path, mmap_mode="r")
        described[name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                           "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return described


def _expected_count(manifest: dict, index: int) -> int:
    return min(manifest["shard_size"], manifest["num"] - index * manifest["shard_size"])


def shard_problem(directory: Path, index: int, manifest: dict) -> str | None:
    """Why shard `index` under `directory` cannot be used (a missing, truncated or changed file,
    the wrong shape or dtype, a digest that differs from the one written with it, values that
    are not finite), or None. A shard from before shard manifests is checked for what its
    files say (shape, dtype, finiteness) and then fingerprinted (its manifest written now,
    with a warning on stderr)."""
    shard = directory / _shard_name(index)
    count, shape = _expected_count(manifest, index), tuple(manifest["shape"])
    wanted = {"z0": ((count, *shape), "float32"), "x1": ((count, *shape), "float32"),
              "y": ((count,), "int64")}
    recorded_path = shard / SHARD_MANIFEST
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else None
    for name in SHARD_FILES:
        path = shard / f"{name}.npy"
        if not path.is_file():
            return f"{path} is missing"
        if recorded is not None and path.stat().st_size != recorded[name]["bytes"]:
            return (f"{path} has {path.stat().st_size} bytes, {recorded[name]['bytes']} when "
                    "written (truncated or replaced)")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            return f"{path} is not a readable .npy file ({type(err).__name__}: {err})"
        if (tuple(array.shape), str(array.dtype)) != (wanted[name][0], wanted[name][1]):
            return (f"{path} holds {array.dtype} {tuple(array.shape)}, expected "
                    f"{wanted[name][1]} {wanted[name][0]}")
        if recorded is not None and file_sha256(path) != recorded[name]["sha256"]:
            return f"{path} differs from what was written (sha256 mismatch)"
        if name != "y" and not np.isfinite(array).all():
            return f"{path} holds non-finite values"
    if recorded is None:
        print(f"onestep: {shard} has no {SHARD_MANIFEST} (made before shard digests): "
              "fingerprinted now", file=sys.stderr)
        write_json_atomic(recorded_path, _describe_shard(shard))
    return None


def generate_pairs(teacher: nn.Module, out: Path, num: int, shape: tuple[int, ...],
                   num_classes: int, *, shard_size: int = 1024, heun_steps: int = 32,
                   solver: str = "heun", seed: int = 0, device: torch.device | str = "cpu",
                   settings: dict | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   part: tuple[int, int] = (0, 1)) -> dict:
    """Draw `num` pairs (z0, x1 = the teacher's ODE solution from z0 by `heun_steps` Heun
    steps, or by scipy's adaptive RK45 with solver="rk45", label) into
    `out`/shard_*/{z0,x1,y}.npy, shard by shard: each is written under a temporary name and
    renamed, so a killed run resumes without redoing finished shards (the manifest pairs.json
    must match: teacher settings, count, shard size, seed). Labels cycle 0..num_classes-1
    (balanced); each shard's noise comes from a generator seeded by (seed, shard). `part` =
    (i, n): this process draws the shards whose index is i modulo n (under torchrun: its rank
    and the world size), so that n processes fill one directory together, the same shards
    as one process would. Returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if solver not in ("heun", "rk45"):
        raise ArgumentError(f"solver: expected 'heun' or 'rk45', got {solver!r}")
    mine, parts = part
    if not 0 <= mine < parts:
        raise ArgumentError(f"part: expected (i, n) with 0 <= i < n, got {part}")
    manifest = {"num": num, "shape": list(shape), "num_classes": num_classes,
                "shard_size": shard_size, "solver": solver,
                "heun_steps": heun_steps if solver == "heun" else None, "seed": seed,
                "teacher": settings or {}}
    path = out / PAIRS_MANIFEST
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(manifest)):
            raise DataError(f"--out: {out} holds pairs made with other settings ({saved}); "
                             "use another directory")
    else:  # (the processes of one torchrun may all write it)
        write_json_atomic(path, manifest)
    shards = -(-num // shard_size)
    teacher = teacher.to(device).eval()
    for index in range(mine, shards, parts):
        final = out / _shard_name(index)
        if final.is_dir():
            problem = shard_problem(out, index, manifest)
            if problem is None:
                continue
            print(f"onestep: redrawing shard {index}: {problem}", file=sys.stderr)
            shutil.rmtree(final)
        start = index * shard_size
        count = min(shard_size, num - start)
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        z0 = torch.randn((count, *shape), generator=g)
        y = (torch.arange(start, start + count) % num_classes) if num_classes else None
        labels = None if y is None else y.to(device)
        with torch.no_grad():
            if solver == "heun":
                x1 = flow.heun(teacher, z0.to(device), heun_steps, labels)
            else:
                x1 = flow.rk45(teacher, z0.to(device), labels)[0]
        x1 = x1.float().cpu()
        if not bool(torch.isfinite(x1).all()):
            raise DataError(f"teacher: shard {index} holds non-finite samples")
        tmp = out / f".tmp_{_shard_name(index)}"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
        tmp.mkdir()
        labels_out = y if y is not None else torch.zeros(count, dtype=torch.long)
        with WritingInto(tmp, naming=final):  # (a full disk names the shard)
            for name, array in (("z0", z0), ("x1", x1), ("y", labels_out)):
                np.save(tmp / f"{name}.npy", array.numpy())
            write_json_atomic(tmp / SHARD_MANIFEST, _describe_shard(tmp))
        os.replace(tmp, final)
        if progress is not None:
            progress(index + 1, shards)
    return manifest


def load_pairs(directory: Path) -> tuple[TensorDataset, dict]:
    """(TensorDataset(x1, y, z0), manifest) from generate_pairs' shards, read in memory."""
    directory = Path(directory)
    path = directory / PAIRS_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"--pairs: no {PAIRS_MANIFEST} in {directory}")
    manifest = json.loads(path.read_text())
    shards = -(-manifest["num"] // manifest["shard_size"])
    missing = [i for i in range(shards) if not (directory / _shard_name(i)).is_dir()]
    if missing:
        raise DataError(f"--pairs: {directory} is incomplete (shard {missing[0]} of {shards} "
                         "missing); run `onestep pairs` again to finish it")
    for i in range(shards):  # every shard checked before any is used
        problem = shard_problem(directory, i, manifest)
        if problem is not None:
            raise DataError(f"--pairs: {problem}; run `onestep pairs` with the same settings "
                            "again to redraw it")
    parts = {name: [] for name in ("x1", "y", "z0")}
    for i in range(shards):
        for name in parts:  # read through the memory map, copied once into the whole array
            array = np.load(directory / _shard_name(i) / f"{name}.npy", mmap_mode="r")
            parts[name].append(array)
    tensors = [torch.from_numpy(np.concatenate(parts[name])) for name in ("x1", "y", "z0")]
    return TensorDataset(*tensors), manifest


def pairs_fingerprint(directory: Path) -> dict:
    """The fingerprint of a pairs folder (onestep_models.data_record): its manifest's settings
    and each shard file's sha256 as its shard.json records it (load_pairs verifies those)."""
    directory = Path(directory)
    manifest = json.loads((directory / PAIRS_MANIFEST).read_text())
    files = {}
    for i in range(-(-manifest["num"] // manifest["shard_size"])):
        recorded = json.loads((directory / _shard_name(i) / SHARD_MANIFEST).read_text())
        for name in SHARD_FILES:
            files[f"{_shard_name(i)}/{name}.npy"] = recorded[name]["sha256"]
    return {"kind": "pairs", "settings": manifest, "files": files}


def count_macs(model: nn.Module, *inputs: Tensor) -> int:
    """Multiply-accumulates of one call (matrix products, convolutions, attention), by
    torch's FLOP counter; per batch of `inputs`."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2
