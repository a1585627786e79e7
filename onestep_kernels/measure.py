"""Times every backend of every op on this device and stores the order, fastest first, which
then takes precedence over the ops' own `default_order` rows (onestep_kernels.preferences).

    python -m onestep_kernels.measure [--device cuda]    # measure, store, print
    python -m onestep_kernels.measure --show             # the order in use, per op

Each op is timed at its own example call (`OpSpec.example`): on a GPU bf16 at DiT-XL/2's
sizes, B=128, where the GPU's time dominates a launch's host time (at B=32 an H100's host made
the CUDA C++ LayerNorm ops look faster than Triton's, which at B=128 are 1.6x faster; CUDA
graphs and training batches see the GPU's time); on the CPU fp32 at DiT-S's width, B=4.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from . import dispatch, preferences
from .dispatch import OPS
from .errors import headline
from .op_spec import Sizes, dit_sizes


def sizes(device: torch.device) -> tuple[Sizes, torch.dtype]:
    if device.type == "cuda":
        return dit_sizes(128), torch.bfloat16
    return dit_sizes(4, width=384, heads=6), torch.float32


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


def example_calls(device: torch.device) -> dict:
    """op name -> call(backend): each op's example call (OpSpec.example) at this device's
    sizes, on the backend named."""
    shape, dtype = sizes(device)
    generator = torch.Generator(device=device).manual_seed(0)
    calls = {}
    for op in OPS.values():
        if op.spec.example is not None and op.public is not None:
            args, kwargs = op.spec.example(shape, device, dtype, generator)
            calls[op.name] = (lambda backend, public=op.public, args=args, kwargs=kwargs:
                              public(*args, **kwargs, backend=backend))
    return calls


def measure(device: torch.device) -> tuple[dict, dict]:
    """(seconds, failed): the time of every backend that can run each op's example call on
    `device`, and the error of each that should have run it but failed (left out of the order,
    so that the order still regenerates; the error is reported)."""
    results, failed = {}, {}
    with torch.no_grad():
        for op_name, call in example_calls(device).items():
            timings = {}
            for name in OPS[op_name].backends:
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


def measure_and_store(device: torch.device) -> dict:
    """Time every backend here and store the order for this device; returns the entry."""
    timings, failed = measure(device)
    entry = {"order": {op: sorted(t, key=t.get) for op, t in timings.items()},
             "seconds": timings, "dtype": str(sizes(device)[1]),
             "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    if failed:
        entry["failed"] = failed
    preferences.store(device, entry)
    # the stored order takes effect in this process too: forget resolutions made before it
    # (the measured calls themselves resolve inner ops, fused_linear's "separate" for one)
    dispatch.clear_cache()
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--show", action="store_true", help="print the order in use, per op")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.show:
        for op in OPS.values():
            print(f"{op.name}: {', '.join(op.order(device))}")
        return 0
    entry = measure_and_store(device)
    for op, t in entry["seconds"].items():
        print(f"{op}: " + ", ".join(f"{n} {s * 1e3:.3f} ms" for n, s in sorted(t.items(),
                                                                            key=lambda i: i[1])))
        for name, error in entry.get("failed", {}).get(op, {}).items():
            print(f"{op}: {name} failed ({error})")
    print(f"stored for {preferences.device_key(device)} in {preferences.cache_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
