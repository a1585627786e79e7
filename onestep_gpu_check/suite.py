"""The GPU pass's test row: the whole test suite on the GPU, the GPU's own tests first, within
the pass's time budget."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .rows import Row

REPO = Path(__file__).resolve().parent.parent


# The tests that exercise the GPU most, first: a run cut short by its time budget has run them.
GPU_TESTS_FIRST = ("tests/ops", "tests/test_layers.py", "tests/test_autocast.py",
                   "tests/test_cuda_graph.py", "tests/models/test_dit.py",
                   "tests/models/test_train.py")


def ordered_test_files() -> list[str]:
    """Every test file, GPU_TESTS_FIRST's first (pytest runs files in the order given; a
    directory given beside its parent would be collected in the parent's order)."""
    def files(path: Path) -> list[Path]:
        return sorted(path.rglob("test_*.py")) if path.is_dir() else [path]

    first = [f for name in GPU_TESTS_FIRST for f in files(REPO / name)]
    rest = [f for f in files(REPO / "tests") if f not in first]
    return [str(f.relative_to(REPO)) for f in first + rest]


# A time.time() value after which the test suite starts no test (tests/conftest.py skips them
# with this reason, which the tests row counts).
TEST_DEADLINE_ENV = "ONESTEP_TEST_DEADLINE"
TEST_DEADLINE_SKIP = f"the run's time budget is spent ({TEST_DEADLINE_ENV})"


def junit_counts(path: Path) -> dict:
    """tests, failures, errors, skipped and cut (skipped by the time budget) of a JUnit XML
    report; {} where there is none."""
    import xml.etree.ElementTree as ET

    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        return {}
    counts = {"tests": len(cases), "failures": 0, "errors": 0, "skipped": 0, "cut": 0}
    for case in cases:
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(kind)
            if found is not None:
                counts[key] += 1
                if kind == "skipped" and TEST_DEADLINE_SKIP in (found.get("message") or ""):
                    counts["cut"] += 1
    return counts


def row_tests(row: Row) -> None:
    """The test suite on this machine's GPU (pytest-xdist when installed), the GPU's own tests
    first. Tests that would start after the pass's deadline are skipped (TEST_DEADLINE_ENV,
    tests/conftest.py), so a run cut short still reports what it ran."""
    out = row.out / "tests.xml"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", f"--junitxml={out}", "-p",
               "no:cacheprovider"]
    if row.s.device.type == "cpu":
        command += ["tests/test_cuda_graph.py"]  # the smoke run checks the plumbing only
    else:
        try:
            import xdist  # noqa: F401

            # (Triton compiles and autotunes at each awkward shape: workers on every core)
            command += ["-n", str(os.cpu_count() or 1)]
        except ImportError:
            pass
        command += ordered_test_files()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Autotune off: every awkward test shape would compile and time each option; the options'
    # correctness is tests/test_tuning.py's, and the benchmark rows autotune as users do.
    env.setdefault("ONESTEP_AUTOTUNE", "0")
    left = row.deadline - time.perf_counter()
    # no test starts in the last 30 s, which the running ones and the report take
    env.setdefault(TEST_DEADLINE_ENV, str(time.time() + left - 30))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=None if left == float("inf") else max(left + 30, 1))
        tail, code = done.stdout.strip().splitlines()[-3:], done.returncode
    except subprocess.TimeoutExpired:
        tail, code = ["timed out"], None
    counts = junit_counts(out)
    row.add(case="pytest", contender=" ".join(command[3:]), exit_code=code, summary=tail,
            seconds=round(time.perf_counter() - start, 1), **counts)
    if code is None or (code == 0 and counts.get("cut")):
        passed = None  # not all of it ran: nothing failed in what did, if the code is 0
    else:
        passed = float(code == 0)
    row.target("GPU test suite passes (exit code 0, every test run)", passed, 1.0)
