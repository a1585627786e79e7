"""The GPU pass in one command: build, benchmark rows, tests, preference order; JSON plus a
markdown table (`python -m onestep_gpu_check`, see the package's docstring)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from . import rows, suite
from .report import environment, markdown
from .rows import Row, Setting, gpu_setting, smoke_setting

REPO = Path(__file__).resolve().parent.parent

# Every row, in the order a pass runs them, most important first.
ROWS: dict[str, Callable[[Row], None]] = {
    "ceilings": rows.row_ceilings, "block": rows.row_block, "dit": rows.row_dit,
    "profile": rows.row_profile, "memory_bound": rows.row_memory_bound,
    "attention": rows.row_attention, "fused_linear": rows.row_fused_linear,
    "slt": rows.row_slt, "screening": rows.row_screening, "diffusers": rows.row_diffusers,
    "host": rows.row_host, "autotune": rows.row_autotune,
    "preferences": rows.row_preferences, "tests": suite.row_tests,
}


def build(out: Path) -> dict:
    """pip install -e . for this GPU's architecture (ONESTEP_CUDA_ARCHS)."""
    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, ONESTEP_CUDA_ARCHS=f"{major}{minor}")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "-e", str(REPO)], env=env,
                          capture_output=True, text=True)
    (out / "build.log").write_text(done.stdout + done.stderr)
    return {"arch": f"sm_{major}{minor}", "exit_code": done.returncode,
            "seconds": round(time.perf_counter() - start, 1)}


def run(names: list[str], out: Path, setting: Setting, budget_s: float,
        do_build: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {"rows": {}}
    results["environment"] = environment(setting)
    deadline = time.perf_counter() + budget_s
    if do_build:
        results["build"] = build(out)
        print(f"build: {results['build']}", flush=True)
    ceilings = dict(results.get("ceilings", {}))
    for name in names:
        if time.perf_counter() > deadline:
            print(f"{name}: skipped, the time budget is spent", flush=True)
            continue
        row = Row(name, setting, ceilings)
        row.out, row.deadline = out, deadline
        start = time.perf_counter()
        try:
            ROWS[name](row)
            error = None
        except Exception:  # noqa: BLE001 - the pass goes on; the row records why it stopped
            error = traceback.format_exc(limit=-6)  # the innermost frames: where it was raised
        results["rows"][name] = {"records": row.records, "targets": row.targets,
                                 "seconds": round(time.perf_counter() - start, 1),
                                 "error": error}
        results["ceilings"] = ceilings
        print(f"{name}: {len(row.records)} records in {results['rows'][name]['seconds']} s"
              + (f"; stopped: {error.splitlines()[-1]}" if error else ""), flush=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)  # after every row: a pass cut short keeps what it measured
        (out / "gpu_check.md").write_text(markdown(results, ROWS))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onestep_gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated rows among: {', '.join(ROWS)}")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="start no new row after this many seconds")
    parser.add_argument("--no-build", action="store_true", help="use the installed build")
    parser.add_argument("--smoke", action="store_true",
                        help="run the rows on the CPU at tiny shapes (plumbing check)")
    args = parser.parse_args(argv)
    names = list(ROWS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; expected some of {', '.join(ROWS)}")
    if args.smoke:
        setting = smoke_setting()
    elif not torch.cuda.is_available():
        print("onestep_gpu_check: no CUDA device here; nothing to do (--smoke checks the "
              "plumbing on the CPU)")
        return 0
    else:
        setting = gpu_setting()
    if "ceilings" not in names and not args.smoke:
        names.insert(0, "ceilings")  # every rate is read against ceilings of the same run
    results = run(names, args.out, setting, args.budget_s,
                  do_build=not args.no_build and not args.smoke)
    print(f"results: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    failed = [name for name in names if results["rows"].get(name, {}).get("error")]
    return 1 if failed else 0
