"""Compile-only check of every Triton kernel configuration for sm_80 and sm_90 (no GPU needed).

Each configuration that an op's launcher can pick (listed by `triton_configs()` in the op
modules of onestep_kernels.ops.OP_MODULES, as `kernel_config.KernelConfig`s: the kernel, the element type of
its data, its constexprs and warps) is compiled with `triton.compile` for a GPUTarget, with the
signature derived from the kernel's own parameters, and its PTX is assembled by the ptxas
shipped in the Triton wheel with `-v`; a configuration with spill stores, or one that fails to
compile, is reported.

    python -m onestep_kernels.aot [--arch 80 90] [--jobs 2]

exits non-zero on any failure. Run it without TRITON_INTERPRET (the test suite does so in a
subprocess), since the interpreter replaces the compiler.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = (80, 90)


@dataclasses.dataclass
class Result:
    name: str
    arch: int
    registers: int = -1
    spill_stores: int = -1
    shared_bytes: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_stores == 0


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this architecture (the wheel ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def configs():
    from .ops import OP_MODULES

    for module in OP_MODULES:
        yield from module.triton_configs()


def compile_one(index: int, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = list(configs())[index]
    result = Result(config.name, arch)
    try:
        compiled = triton.compile(
            ASTSource(fn=config.kernel, signature=config.signature(),
                      constexprs=config.constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps},
        )
        result.shared_bytes = int(compiled.metadata.shared)
        ptx = compiled.asm["ptx"]
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = Path(tmp) / "kernel.ptx"
            ptx_path.write_text(ptx)
            report = subprocess.run(
                [_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", str(ptx_path),
                 "-o", str(Path(tmp) / "kernel.o")],
                capture_output=True, text=True, check=True,
            ).stderr
        result.spill_stores = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))
        registers = re.findall(r"Used (\d+) registers", report)
        result.registers = max(int(n) for n in registers) if registers else -1
    except subprocess.CalledProcessError as error:
        result.error = f"ptxas failed: {error.stderr.strip()[:300]}"
    except Exception as error:  # reported per configuration, not raised
        result.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return result


def run(archs=ARCHS, jobs: int = 2) -> list[Result]:
    count = len(list(configs()))
    tasks = [(i, arch) for i in range(count) for arch in archs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, *zip(*tasks)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compile check needs the real compiler", file=sys.stderr)
        return 2
    results = run(args.arch, args.jobs)
    for r in results:
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else "SPILLS")
        print(f"sm_{r.arch} {r.name}: registers={r.registers} spill_stores={r.spill_stores} "
              f"shared={r.shared_bytes} {status}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
