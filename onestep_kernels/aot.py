"""Compile-only check of every Triton kernel configuration for sm_80 and sm_90 (no GPU needed).

Each configuration that an op's launcher can pick (listed by each op's `triton_configs()`,
declared with its records in onestep_kernels.dispatch.OPS, as `kernel_config.KernelConfig`s:
the kernel, the element type of its data, its constexprs and warps) is compiled with
`triton.compile` for a GPUTarget, with the signature derived from the kernel's own
parameters, and its PTX is assembled by the ptxas
shipped in the Triton wheel with `-v`; a configuration with spill stores, or one that fails to
compile, is reported.

    python -m onestep_kernels.aot [--arch 80 90] [--jobs 2]
    python -m onestep_kernels.aot --vectors      # 128-bit accesses in the memory-bound kernels
    python -m onestep_kernels.aot --inductor     # torch.compile can rebuild each kernel

exits non-zero on any failure. Run it without TRITON_INTERPRET (the test suite does so in a
subprocess), since the interpreter replaces the compiler.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
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
    from .dispatch import OPS

    for op in OPS.values():
        if op.triton_configs is not None:
            yield from op.triton_configs()


def compile_config(config, arch: int, aligned: bool = False):
    """triton.compile of one configuration for sm_<arch>. `aligned`: every pointer, size and
    stride divisible by 16, as Triton's JIT specialises them at DiT shapes (widths 384..1152,
    256 tokens), which is what lets it emit vector loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = config.signature()
    attrs = {}
    if aligned:
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in
                 enumerate(signature.items()) if kind.startswith("*") or kind == "i32"}
    return triton.compile(
        ASTSource(fn=config.kernel, signature=signature, constexprs=config.constexprs,
                  attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def compile_one(index: int, arch: int) -> Result:
    config = list(configs())[index]
    result = Result(config.name, arch)
    try:
        compiled = compile_config(config, arch)
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


# ---- vector width of the memory-bound kernels -------------------------------------------------

# The row blocks DiT widths use (384..1152 → 512..2048; the MLP's 4x width → bias_gelu_tanh's
# 1024-wide column block), at which the memory-bound kernels (KernelConfig.row_scalars) must
# move whole 128-bit vectors.
DIT_BLOCKS = (512, 1024, 2048)


def global_accesses(ptx: str) -> list[int]:
    """Bits moved by each global load and store instruction in a PTX listing."""
    bits = []
    for op in re.findall(r"\b(?:ld|st)\.global\S*", ptx):
        lanes = re.search(r"\.v(\d)", op)
        width = re.findall(r"\.[bfsu](\d+)\b", op)
        bits.append((int(lanes.group(1)) if lanes else 1) * int(width[-1]))
    return bits


def vector_configs():
    for config in configs():
        block = config.constexprs.get("BLOCK_D", config.constexprs.get("BLOCK_F"))
        if config.row_scalars is not None and block in DIT_BLOCKS:
            yield config, config.row_scalars


def vector_check_one(index: int) -> tuple[str, str]:
    """(name, problem or ""): every global access of the sm_90 PTX is 128 bits wide except
    the kernel's per-row scalars (`scalars` of them)."""
    return vector_problem(*list(vector_configs())[index])


def vector_problem(config, scalars: int) -> tuple[str, str]:
    try:
        bits = global_accesses(compile_config(config, 90, aligned=True).asm["ptx"])
    except Exception as error:  # reported per configuration
        return config.name, f"{type(error).__name__}: {error}".splitlines()[0][:300]
    narrow = [b for b in bits if b != 128]
    share = sum(b for b in bits if b == 128) / max(1, sum(bits))
    summary = f"{len(bits) - len(narrow)}/{len(bits)} accesses 128-bit ({share:.0%} of bits)"
    if len(narrow) > scalars or not bits:
        return config.name, f"{summary}; narrow: {sorted(narrow)} (allowed: {scalars} scalars)"
    return config.name, ""


def inductor_problem(kernel) -> str:
    """Why inductor could not compile `kernel` under torch.compile, or "". Inductor launches a
    wrap_triton kernel from a copy of its source plus the jit functions and constants that it
    names; a name it cannot carry over (a module attribute such as `core.f`, a float constant)
    is undefined there, and the compile fails on the GPU ("core is not defined"). This builds
    that copy with inductor's own function and checks every global each function in it loads."""
    import builtins
    import dis

    import triton
    from torch._inductor.codegen.wrapper import (
        user_defined_triton_kernel_transitive_closure_source_code as inductor_copy,
    )

    copy = inductor_copy(kernel)  # the kernel's own source comes undecorated
    source = "import triton\nimport triton.language as tl\n" + (
        copy if copy.lstrip().startswith("@") else "@triton.jit\n" + copy.lstrip())
    with tempfile.TemporaryDirectory() as folder:  # @triton.jit reads its source from a file
        path = Path(folder) / f"copy_of_{kernel.fn.__name__}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - reported, as a compile failure would be
            return f"the copy does not run: {error!r}"
    namespace = vars(module)
    for function in [v for v in namespace.values() if isinstance(v, triton.JITFunction)]:
        loads = {i.argval for i in dis.Bytecode(function.fn) if i.opname == "LOAD_GLOBAL"}
        missing = sorted(n for n in loads if n not in namespace and not hasattr(builtins, n))
        if missing:
            return f"{function.fn.__name__} loads {missing}, which inductor's copy lacks"
    return ""


def inductor_kernels() -> dict:
    """Every kernel of the registry, once: name -> JITFunction."""
    return {config.kernel.fn.__name__: config.kernel for config in configs()}


def run(archs=ARCHS, jobs: int = 2, only: str = "") -> list[Result]:
    names = [c.name for c in configs()]
    tasks = [(i, arch) for i, name in enumerate(names) if name.startswith(only) for arch in archs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, *zip(*tasks)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", default="", help="configurations whose name starts so")
    parser.add_argument("--vectors", action="store_true",
                        help="instead: check that the memory-bound kernels' sm_90 PTX at DiT "
                             "widths moves 128-bit vectors")
    parser.add_argument("--inductor", action="store_true",
                        help="instead: check that inductor can rebuild each kernel from its "
                             "source (what torch.compile does with wrap_triton kernels)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compile check needs the real compiler", file=sys.stderr)
        return 2
    if args.inductor:
        problems = {name: inductor_problem(k) for name, k in sorted(inductor_kernels().items())}
        for name, problem in problems.items():
            print(f"inductor {name}: {problem or 'ok'}")
        failed = sum(1 for problem in problems.values() if problem)
        print(f"{len(problems) - failed} passed, {failed} failed")
        return 1 if failed else 0
    if args.vectors:
        count = len(list(vector_configs()))
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
            checked = list(pool.map(vector_check_one, range(count)))
        for name, problem in checked:
            print(f"sm_90 {name}: {problem or 'ok'}")
        failed = sum(1 for _, problem in checked if problem)
        print(f"{count - failed} passed, {failed} failed")
        return 1 if failed else 0
    results = run(args.arch, args.jobs, args.only)
    for r in results:
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else "SPILLS")
        print(f"sm_{r.arch} {r.name}: registers={r.registers} spill_stores={r.spill_stores} "
              f"shared={r.shared_bytes} {status}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
