"""The GPU pass's report: the machine and versions it ran on, and its rows as markdown."""

from __future__ import annotations

import datetime
import json

import torch

from .rows import Setting


def environment(setting: Setting) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "dtype": str(setting.dtype).replace("torch.", "")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if setting.device.type == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu (smoke: numbers mean nothing)"
    return info


def markdown(results: dict, row_names) -> str:
    env = results["environment"]
    lines = [f"# onestep GPU pass — {env.get('device')}", "",
             f"{env.get('date')}; torch {env.get('torch')}, Triton {env.get('triton')}, "
             f"{env.get('dtype')}; `python -m onestep_gpu_check`", ""]
    for name in row_names:
        if name not in results["rows"]:
            continue
        row = results["rows"][name]
        lines += [f"## {name}", "",
                  "| case | contender | ms | ms alone | rate | of ceiling | other |",
                  "|---|---|---|---|---|---|---|"]
        for r in row["records"]:
            rate = next((f"{r[u]} {u}" for u in ("GB/s", "GFLOP/s") if u in r), "")
            other = {k: v for k, v in r.items() if k not in (
                "case", "contender", "ms", "alone_ms", "GB/s", "GFLOP/s", "of_ceiling")}
            lines.append(f"| {r.get('case', '')} | {r.get('contender', '')} | {r.get('ms', '')} "
                         f"| {r.get('alone_ms', '')} | {rate} | {r.get('of_ceiling', '')} | "
                         f"{json.dumps(other) if other else ''} |")
        if row["targets"]:
            lines += ["", "| target | value | met |", "|---|---|---|"]
            for t in row["targets"]:
                met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
                lines.append(f"| {t['target']} | {t['value']} | {met} |")
        lines.append("")
    return "\n".join(lines)
