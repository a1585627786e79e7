"""The README's table of ops and backends, written from the backend records and their default
orders, so that the documentation cannot drift from the code.

    python -m onestep_kernels.optable            # print the table
    python -m onestep_kernels.optable --write    # replace it in README.md (between markers)

tests/test_optable.py fails when README.md differs from what this prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

BEGIN = "<!-- op table: written by `python -m onestep_kernels.optable --write`; do not edit -->"
END = "<!-- end of op table -->"
README = Path(__file__).resolve().parent.parent / "README.md"
_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float64: "fp64"}


def _limits(record, width_name: str) -> str:
    parts = []
    if record.min_width > 1 or record.max_width is not None:
        top = "" if record.max_width is None else f"..{record.max_width}"
        parts.append(f"{width_name} {record.min_width}{top}")
    for dtype, limit in record.max_width_by_dtype:
        parts.append(f"{_DTYPE[dtype]}: {width_name} ≤ {limit}")
    if record.runtime == "triton":
        parts.append("CPU tensors only under TRITON_INTERPRET=1, not bf16")
    return "; ".join(parts) or "—"


def table() -> str:
    from .dispatch import ANY_DEVICE, OPS

    lines = [BEGIN, "",
             "| op | backend | runs | dtypes | limits | backward | default order: CPU / sm_90 |",
             "|---|---|---|---|---|---|---|"]
    for op in OPS.values():
        cpu_order = op.default_order.get("cpu", ())
        gpu_order = op.default_order.get("sm_90", ())
        for record in op.backends.values():
            devices = "any device" if record.devices == ANY_DEVICE else "/".join(record.devices)
            rank = "/".join(str(order.index(record.name) + 1) if record.name in order else "—"
                            for order in (cpu_order, gpu_order))
            lines.append(
                f"| `{op.name}` | `{record.name}` | {devices} | "
                f"{', '.join(_DTYPE[d] for d in record.dtypes)} | {_limits(record, op.width_name)}"
                f" | {op.backward_name(record)} | {rank} |")
    lines += ["", "Backends: " + "; ".join(
        f"`{r.name}` ({op.name}): {r.summary}" for op in OPS.values()
        for r in op.backends.values() if r.summary and r.name != "reference") + ".",
        "", END]
    return "\n".join(lines)


def readme_section(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the table in {README}")
    args = parser.parse_args(argv)
    generated = table()
    if not args.write:
        print(generated)
        return 0
    text = README.read_text()
    README.write_text(text.replace(readme_section(text), generated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
