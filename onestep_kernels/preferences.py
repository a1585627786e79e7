"""The default backend of each op on each kind of device: fastest first, as measured.

`TABLE` maps a device class ("cpu", or "sm_<major><minor>" for a CUDA GPU) to each op's
backends in order of measured speed; the resolver (onestep_kernels.dispatch) takes the first
one that can run a call, then the op's remaining backends. A GPU whose architecture has no row
uses the sm_90 row. A measurement made on the user's own device takes precedence over the
table: it is stored per device in $ONESTEP_CACHE_DIR/preferences.json (default
~/.cache/onestep/); ONESTEP_PREFERENCES=builtin ignores it.

    python -m onestep_kernels.preferences --measure [--device cuda]   # measure, store, print

Where the rows come from (re-measure with the command above and update them with the date):
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
  At B=32 `--measure` (do_bench, whose time includes a launch's host time) had the CUDA C++
  LayerNorm ops ahead of Triton (0.082 against 0.124 ms, 0.067 against 0.090): there the
  launch's host time is the op's time. So `--measure` now times B=128 on a GPU (not yet run
  on one), where the GPU's time dominates, as in training batches and CUDA-graph replay.
- cpu: 2-core Intel Xeon VM, torch 2.13.0, fp32, B=4, N=256, D=384 (this module's
  --measure), 2026-11-25: layernorm_modulate C++ 0.14 ms, PyTorch 0.87; gated residual C++
  0.23, PyTorch 1.03; bias_gelu_tanh C++ 1.04, PyTorch 1.98; attention SDPA 1.94, C++ 3.41.
  (On the 2-core AMD EPYC VM of 2026-11-24 the C++ attention led SDPA by 1.03-1.16x; which
  one wins depends on the processor, so the default is SDPA, never the slower by much, and
  --measure puts the C++ kernel first where it wins.)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

TABLE: dict[str, dict[str, tuple[str, ...]]] = {
    "sm_90": {
        "layernorm_modulate": ("triton", "reference", "cuda"),
        "gated_residual_layernorm_modulate": ("triton", "cuda", "reference"),
        "bias_gelu_tanh": ("triton", "cuda", "reference"),
        "attention": ("sdpa", "triton", "reference"),
        "fused_linear": ("separate", "reference", "triton"),
    },
    "cpu": {
        "layernorm_modulate": ("cpu", "reference"),
        "gated_residual_layernorm_modulate": ("cpu", "reference"),
        "bias_gelu_tanh": ("cpu", "reference"),
        "attention": ("sdpa", "cpu", "reference"),
        "fused_linear": ("separate", "reference"),
    },
}
FALLBACK_GPU_CLASS = "sm_90"


def device_class(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    from .dispatch import device_capability

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


def order(op: str, device: torch.device) -> tuple[str, ...]:
    """`op`'s backends for `device`, fastest first (as measured; may be empty)."""
    measured = _measured(device_key(device)).get(op)
    if measured:
        return measured
    cls = device_class(device)
    row = TABLE.get(cls) or (TABLE[FALLBACK_GPU_CLASS] if device.type == "cuda" else {})
    return row.get(op, ())


# ---- measuring on the user's device ---------------------------------------------------------


def _shapes(device: torch.device) -> dict:
    if device.type == "cuda":
        # DiT-XL/2 in bf16, at a batch where the GPU's time dominates the launch's host time
        # (at B=32 an H100's host made the CUDA C++ LayerNorm ops look faster than Triton's,
        # which at B=128 are 1.6x faster; CUDA graphs and training batches see the GPU's time)
        return {"dtype": torch.bfloat16, "B": 128, "N": 256, "D": 1152, "H": 16, "F": 4608}
    return {"dtype": torch.float32, "B": 4, "N": 256, "D": 384, "H": 6, "F": 1536}


def _calls(device: torch.device) -> dict:
    """op -> (function(backend), description): one representative forward per op."""
    import onestep_kernels as ok

    s = _shapes(device)
    B, N, D, H, F, dtype = s["B"], s["N"], s["D"], s["H"], s["F"], s["dtype"]
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g, device=device).to(dtype)

    x, y, mods = rand(B, N, D), rand(B, N, D), rand(B, 6 * D).chunk(6, dim=1)
    u, bias = rand(B * N, F), rand(F)
    q, k, v = (rand(B, H, N, D // H) for _ in range(3))
    w = rand(3 * D, D) * D ** -0.5
    return {
        "layernorm_modulate": lambda b: ok.layernorm_modulate(x, mods[0], mods[1], backend=b),
        "gated_residual_layernorm_modulate":
            lambda b: ok.gated_residual_layernorm_modulate(x, y, *mods[2:5], backend=b),
        "bias_gelu_tanh": lambda b: ok.bias_gelu_tanh(u, bias, backend=b),
        "attention": lambda b: ok.attention(q, k, v, backend=b),
        "fused_linear": lambda b: ok.fused_linear(x, w, shift=mods[0], scale=mods[1], backend=b),
    }


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e-3
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(device: torch.device) -> tuple[dict, dict]:
    """(seconds, failed): the time of every backend that can run each op's representative
    call on `device`, and the error of each that should have run it but failed (left out of
    the order, so that the table still regenerates; the error is reported)."""
    from .dispatch import OPS

    results, failed = {}, {}
    with torch.no_grad():
        for op_name, call in _calls(device).items():
            op = OPS[op_name]
            timings = {}
            for name in op.backends:
                try:
                    timings[name] = _time(lambda: call(name), device)
                except ValueError as err:
                    if "cannot run" in str(err):  # the resolver: not for this call or device
                        continue
                    failed.setdefault(op_name, {})[name] = headline(err)
                except Exception as err:  # noqa: BLE001 - a failing backend is a result
                    failed.setdefault(op_name, {})[name] = headline(err)
            results[op_name] = timings
    return results, failed


def headline(err: BaseException) -> str:
    """An error in one line: its type and the first line of its message (gpu_check's records
    use it too)."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true",
                        help="time every backend on this device and store the order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not args.measure:
        for op in TABLE["cpu"]:
            print(f"{op}: {', '.join(order(op, device))}")
        return 0
    entry = measure_and_store(device)
    for op, t in entry["seconds"].items():
        print(f"{op}: " + ", ".join(f"{n} {s * 1e3:.3f} ms" for n, s in sorted(t.items(),
                                                                            key=lambda i: i[1])))
        for name, error in entry.get("failed", {}).get(op, {}).items():
            print(f"{op}: {name} failed ({error})")
    print(f"stored for {device_key(device)} in {cache_path()}")
    return 0


def measure_and_store(device: torch.device) -> dict:
    """Time every backend here and store the order for this device; returns the entry."""
    timings, failed = measure(device)
    key = device_key(device)
    entry = {"order": {op: sorted(t, key=t.get) for op, t in timings.items()},
             "seconds": timings, "dtype": str(_shapes(device)["dtype"]),
             "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    if failed:
        entry["failed"] = failed
    path = cache_path()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    stored[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=1))
    tmp.replace(path)
    from .dispatch import clear_cache

    # the stored order takes effect in this process too: forget resolutions made before it
    # (the measured calls themselves resolve inner ops, fused_linear's "separate" for one)
    clear_cache()
    return entry


if __name__ == "__main__":
    sys.exit(main())
