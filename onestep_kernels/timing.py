"""Two ways to time a call on a GPU, and why a benchmark needs both.

- `alone`: each call between two CUDA events with the queue empty before it. The span holds
  the host's time to launch the call's first kernel (the GPU waits for it) plus the GPU's
  time: the latency of one isolated call (one-step sampling without CUDA graphs).
- `queued`: calls back to back, the queue kept full: the host launches call k+1 while the
  GPU runs call k, so a call costs max(its GPU time, its host time). That is the throughput
  a training loop or batched inference sees, and the only way to read a kernel's GPU speed
  (a rate against the copy rate or the GEMM rate) without its host time in it.

On an H100 whose host took ~20 us for F.layer_norm on tiny tensors, `alone` added tens of
microseconds of launch time to every call: a 0.1 ms memory-bound kernel read 30-50% slower
than it ran. On the CPU both are wall-clock times, and nearly equal.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _span(device: torch.device, fn: Callable, calls: int) -> float:
    """Seconds for `calls` calls of fn, measured on the device's clock where it has one."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e-3


def _warm_up(fn: Callable, device: torch.device) -> float:
    """Runs fn once to warm up (compilation, autotuning, caches), then once more: the wall
    seconds of that second call, which size the measurement."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return max(time.perf_counter() - start, 1e-7)


def alone(fn: Callable, device: torch.device, target_s: float = 0.15) -> float:
    """Median seconds of one call with the queue empty before it (host launch + GPU), after
    warm-up."""
    once = _warm_up(fn, device)
    times = []
    for _ in range(int(min(200, max(5, target_s / once)))):
        sync(device)
        times.append(_span(device, fn, 1))
    return statistics.median(times)


def queued(fn: Callable, device: torch.device, target_s: float = 0.15,
           group_s: float = 0.02) -> float:
    """Median seconds per call over groups of back-to-back calls (each group ~`group_s`, at
    least 3 calls), after warm-up. Each group starts behind a call already queued, so that
    the first call's launch is not inside the span."""
    once = _warm_up(fn, device)
    calls = int(min(1000, max(3, group_s / once)))
    groups = int(min(20, max(3, target_s / (calls * once))))
    times = []
    for _ in range(groups):
        sync(device)
        fn()  # fills the queue; the span's first call then waits behind it, not for the host
        times.append(_span(device, fn, calls) / calls)
    sync(device)
    return statistics.median(times)
