"""Shared benchmark plumbing: the allocator condition, ceilings measured in the same run, and a
closing table of rates (GB/s or GFLOP/s) next to those ceilings.

    pytest benchmarks/                       # glibc's default allocator settings
    pytest benchmarks/ --allocator tuned     # onestep_kernels.tune_cpu_allocator() first

Every contender in one run shares the allocator condition; compare ratios, not absolute times
(the machines are shared).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest
import torch

import onestep_kernels

RESULTS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--allocator", choices=["default", "tuned"], default="default",
                     help="glibc malloc thresholds for large CPU tensors (see onestep_kernels.memory)")


@pytest.fixture(scope="session", autouse=True)
def allocator_condition(request):
    condition = request.config.getoption("--allocator")
    if condition == "tuned" and not onestep_kernels.tune_cpu_allocator():
        pytest.exit("--allocator tuned: this C library has no mallopt (not glibc)")
    if os.environ.get("GLIBC_TUNABLES"):
        condition += f" (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']})"
    return condition


@pytest.fixture(autouse=True)
def release_free_heap(allocator_condition):
    """Under the default condition, hand the heap's free top back to the OS before each
    benchmark (malloc_trim): otherwise whether a large output is a fresh mmap (page faults) or
    a reused heap block depends on what ran before, and contenders would be timed under
    different conditions."""
    if allocator_condition.startswith("default"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def median_seconds(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    return stats.stats.median


@pytest.fixture
def record(benchmark, allocator_condition):
    """record(group, contender, amount, unit): after benchmark(...) ran, store amount/median."""

    def _record(group: str, contender: str, amount: float, unit: str) -> None:
        seconds = median_seconds(benchmark)
        rate = amount / seconds / 1e9 if seconds else float("nan")
        benchmark.extra_info.update({unit: round(rate, 3), "allocator": allocator_condition,
                                     "threads": torch.get_num_threads()})
        RESULTS.append({"group": group, "contender": contender, "rate": rate, "unit": unit,
                        "ms": seconds * 1e3 if seconds else float("nan"),
                        "allocator": allocator_condition})

    return _record


def measure_sgemm_ceiling(benchmark, record):
    """The GEMM rate: a large square SGEMM, 2048^3, into an existing buffer (a test body for
    each benchmark file that reports GFLOP/s, so that each run has its ceiling)."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2048, 2048, generator=g)
    w = torch.randn(2048, 2048, generator=g)
    out = torch.empty(2048, 2048)
    benchmark.group = "ceiling"
    benchmark(torch.mm, a, w, out=out)
    record("ceiling", "SGEMM 2048^3", 2 * 2048**3, "GFLOP/s")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS or all(r["ms"] != r["ms"] for r in RESULTS):  # none, or --benchmark-disable
        return
    tr = terminalreporter
    tr.section("onestep rates (median; ceilings measured in this run)")
    tr.write_line(f"allocator: {RESULTS[0]['allocator']}; torch threads: {torch.get_num_threads()}")
    groups: dict[str, list[dict]] = {}
    for r in RESULTS:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        tr.write_line(f"{group}")
        for r in rows:
            tr.write_line(f"    {r['contender']:<28} {r['ms']:9.3f} ms  {r['rate']:8.2f} {r['unit']}")
