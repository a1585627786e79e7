"""The default backend of each op on each kind of device: fastest first, as measured.

Each op declares, with its backend records, a `default_order` row per device class ("cpu", or
"sm_<major><minor>" for a CUDA GPU): its backends in order of measured speed. The resolver
(onestep_kernels.dispatch) takes the first one that can run a call, then the op's remaining
backends. A GPU whose architecture has no row uses the sm_90 row. A measurement made on the
user's own device takes precedence over the rows: it is stored per device in
$ONESTEP_CACHE_DIR/preferences.json (default ~/.cache/onestep/); ONESTEP_PREFERENCES=builtin
ignores it. This module reads it and names devices; it imports nothing of onestep, so that the
resolver reads it without an import cycle.

    python -m onestep_kernels.measure [--device cuda]   # measure, store, print

Where the op files' rows come from (re-measure with the command above and update them with
the date):
- sm_90: one NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16, DiT-XL/2 shapes,
  2026-11-25 (`python -m onestep_kernels.gpu_check`'s memory_bound, attention, fused_linear
  and preferences rows, the session's first calls; its last call, up to 20% apart in the same
  order, is in benchmarks/results/h100-2026-11-25): forward at B=128 (N=256, D=1152), GB/s
  counting each input read and output written once:
  layernorm_modulate Triton 930, CUDA C++ 567, eager PyTorch 481 (torch.compile 645);
  gated_residual_layernorm_modulate Triton 1461, CUDA C++ 1069, eager 611 (compile 1300);
  bias_gelu_tanh on (32768, 4608) Triton 1787, CUDA C++ 1084, eager 994 (compile 2090).
  attention (32, 16, 256, 72): SDPA (cuDNN) 0.073 ms, Triton 0.277. fused_linear (QKV with
  the LayerNorm prologue, B=32): cuBLAS + the separate ops 0.42 ms, the fused kernel 0.96.
  At B=32 the measurement (do_bench, whose time includes a launch's host time) had the CUDA C++
  LayerNorm ops ahead of Triton (0.082 against 0.124 ms, 0.067 against 0.090): there the
  launch's host time is the op's time. So the measurement now times B=128 on a GPU (not yet run
  on one), where the GPU's time dominates, as in training batches and CUDA-graph replay.
- cpu: 2-core Intel Xeon VM, torch 2.13.0, fp32, B=4, N=256, D=384 (the measurement, then
  `python -m onestep_kernels.preferences --measure`), 2026-11-25: layernorm_modulate C++
  0.14 ms, PyTorch 0.87; gated residual C++ 0.23, PyTorch 1.03; bias_gelu_tanh C++ 1.04,
  PyTorch 1.98; attention SDPA 1.94, C++ 3.41.
  score_candidates (2026-12-05, 2-core AMD EPYC VM, the same command; 64 candidates of 256
  tokens, D=384, 1000 classes): C++ 0.93 ms, PyTorch 1.19 (at 16 tokens the PyTorch
  expression's GEMM wins, 0.66 against 1.20: benchmarks/test_screening.py); its sm_90 row
  (Triton, then CUDA C++) is unmeasured.
  (On the 2-core AMD EPYC VM of 2026-11-24 the C++ attention led SDPA by 1.03-1.16x; which
  one wins depends on the processor, so the default is SDPA, never the slower by much, and
  the measurement puts the C++ kernel first where it wins.)
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

FALLBACK_GPU_CLASS = "sm_90"


@functools.cache
def device_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_class(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = device_capability(device.index)
    return f"sm_{major}{minor}"


def cache_path() -> Path:
    root = os.environ.get("ONESTEP_CACHE_DIR") or Path.home() / ".cache" / "onestep"
    return Path(root) / "preferences.json"


def device_key(device: torch.device) -> str:
    """What a measurement is stored under: the GPU's or the processor's model."""
    if device.type == "cuda":
        return f"{device_class(device)}|{torch.cuda.get_device_name(device)}"
    return f"{device.type}|{_processor()}"


@functools.cache
def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


@functools.cache
def _measured(key: str) -> dict[str, tuple[str, ...]]:
    """The user's own measurement for a device, if there is one."""
    if os.environ.get("ONESTEP_PREFERENCES") == "builtin":
        return {}
    try:
        stored = json.loads(cache_path().read_text())
        return {op: tuple(order) for op, order in stored[key]["order"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def measured_order(op: str, device: torch.device) -> tuple[str, ...]:
    """`op`'s backends for `device` as the user's own measurement ordered them (empty if
    there is none)."""
    return _measured(device_key(device)).get(op, ())


def forget_measurements() -> None:
    """Read the stored measurements afresh at the next call (after storing one, in tests)."""
    _measured.cache_clear()


def store(device: torch.device, entry: dict) -> Path:
    """Store a measurement `entry` ({"order": {op: [backends]}, ...}) for `device`, written to a
    temporary file and renamed; returns the file."""
    path = cache_path()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    stored[device_key(device)] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stored, indent=1))
    tmp.replace(path)
    forget_measurements()
    return path
