"""The SLT rows of `pytest benchmarks/test_slt.py` in shuffled paired rounds, in one process:
every round times each contender once (in a new random order), so that the load of the
moment divides out of the ratios taken within a round. On the shared development VMs the
pytest run's medians moved by up to 35% between runs (and its floor, timed minutes apart from
onestep, came out slower than onestep once); the medians of the per-round ratios are the
steadier measure of the issue's targets. Prints, per size and mode, each contender's median
time and the median (10th-90th percentile) of its per-round ratio to onestep.

    python benchmarks/slt_paired.py [--allocator tuned] [--rounds-scale 1.0]
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # (test_slt, and onestep_gpu_check at the root)
from test_slt import slt_calls  # the pytest benchmark's contenders and shapes

import onestep_kernels

# rounds per (size, mode): a few seconds to a minute each on 2 cores
ROUNDS = {("slt-S", "inference"): 15, ("slt-S", "training"): 15,
          ("slt-tiny", "inference"): 200, ("slt-tiny", "training"): 100}


def paired_rounds(calls: dict, rounds: int) -> dict:
    for call in calls.values():  # warm-up (and torch.compile's compilation)
        for _ in range(3):
            call()
    times = {name: [] for name in calls}
    names = list(calls)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocator", choices=["default", "tuned"], default="default")
    parser.add_argument("--rounds-scale", type=float, default=1.0)
    args = parser.parse_args()
    if args.allocator == "tuned" and not onestep_kernels.tune_cpu_allocator():
        sys.exit("--allocator tuned: this C library has no mallopt (not glibc)")
    print(f"allocator: {args.allocator}; torch threads: {torch.get_num_threads()}")
    random.seed(0)
    for (name, mode), rounds in ROUNDS.items():
        rounds = max(3, round(rounds * args.rounds_scale))
        times = paired_rounds(slt_calls(name, mode), rounds)
        print(f"{name} {mode}, {rounds} rounds: median ms; per-round time / onestep's, "
              "median (10th-90th percentile)")
        for contender, t in times.items():
            ratios = sorted(a / b for a, b in zip(t, times["onestep"]))
            tenth, ninetieth = ratios[len(ratios) // 10], ratios[(9 * len(ratios)) // 10]
            print(f"    {contender:28s} {statistics.median(t) * 1e3:9.3f} ms   "
                  f"{statistics.median(ratios):5.2f}x ({tenth:.2f}-{ninetieth:.2f})")


if __name__ == "__main__":
    main()
