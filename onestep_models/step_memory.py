"""How much memory a training step needs, known before the step is taken, so that a batch that
cannot fit is refused with the estimate instead of swapping for minutes (or dying at its end).

The estimate is a lower bound, measured, not modelled: the recipe's loss runs on two probes of
a few samples (PROBES), every tensor that autograd keeps for the backward is counted through
`torch.autograd.graph.saved_tensors_hooks` (each storage once; parameters, which exist
already, not at all), and the line through the two counts (a part per sample, and a part per
step such as autocast's low-precision copies of the weights) is taken to the step's batch;
the gradients and AdamW's two moments are added when they do not exist yet. Transient tensors
(those freed within the forward) are not counted, so a step can need more, never less: a
refusal is always right, and what passes is confirmed by the first step's report of its time
and peak memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

PROBES = (2, 4)  # samples in the two probes; a batch of at most the larger needs no estimate

import torch
from torch import Tensor


def saved_tensor_bytes(run: Callable[[], object], exclude: list[Tensor]) -> int:
    """Bytes of the storages autograd saves for the backward while `run()` runs (each storage
    once), not counting those of `exclude` (the parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def activation_bytes(run_on: Callable[[int], object], batch: int,
                     exclude: list[Tensor]) -> tuple[int, int]:
    """(bytes per sample, bytes per step) that autograd keeps for the backward, from
    `run_on(n)` (the loss on n samples) at the two PROBES sizes; `batch` larger than both."""
    small, large = PROBES
    at_small = saved_tensor_bytes(lambda: run_on(small), exclude)
    at_large = saved_tensor_bytes(lambda: run_on(large), exclude)
    per_sample = max(0, at_large - at_small) // (large - small)
    return per_sample, max(0, at_small - per_sample * small)


def optimizer_state_bytes(params: list[Tensor], optimizer: torch.optim.Optimizer) -> int:
    """What the first step allocates beside the activations: a gradient per parameter, and
    AdamW's two moments where the optimizer has no state yet (a fresh run)."""
    total = 0
    for p in params:
        size = p.numel() * p.element_size()
        total += size if optimizer.state.get(p) else 3 * size
    return total


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a step on `device`: the GPU's free memory, or the machine's available
    memory (MemAvailable, and a cgroup's limit where one is lower); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    limited = _cgroup_free()
    if limited is not None:
        free = limited if free is None else min(free, limited)
    return free


def peak_bytes(device: torch.device) -> int | None:
    """The peak memory so far: the GPU's allocator peak, or the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (KiB on Linux)
    except (ImportError, OSError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
