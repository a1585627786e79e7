"""Compile-only check of every Triton kernel configuration for sm_80 and sm_90 (no GPU needed).

Each configuration that an op's launcher can pick (listed by each op's `triton_configs()`,
declared with its records in onestep_kernels.dispatch.OPS, as `kernel_config.KernelConfig`s:
the kernel, the element type of its data, its constexprs and warps) is compiled with
`triton.compile` for a GPUTarget, with the signature derived from the kernel's own
parameters, and its PTX is assembled by the ptxas
shipped in the Triton wheel with `-v`; a configuration with spill stores, or one that fails to
compile, is reported.

    python -m onestep_kernels.aot [--arch 80 90] [--jobs 2]
    python -m onestep_kernels.aot --memory-bound # what the memory-bound launchers pick at the
                                                 # widths of real models: useful lanes,
                                                 # 128-bit accesses, spills, backward grid
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


def _assemble(ptx: str, arch: int) -> tuple[int, int]:
    """(bytes of spill stores, registers) of a PTX listing assembled by ptxas -v, with the
    flags Triton 3.9 passes."""
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(ptx)
        report = subprocess.run(
            [_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", str(ptx_path),
             "-o", str(Path(tmp) / "kernel.o")],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = re.findall(r"Used (\d+) registers", report)
    return (sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report)),
            max(int(n) for n in registers) if registers else -1)


def compile_one(index: int, arch: int) -> Result:
    config = list(configs())[index]
    result = Result(config.name, arch)
    try:
        compiled = compile_config(config, arch)
        result.shared_bytes = int(compiled.metadata.shared)
        result.spill_stores, result.registers = _assemble(compiled.asm["ptx"], arch)
    except subprocess.CalledProcessError as error:
        result.error = f"ptxas failed: {error.stderr.strip()[:300]}"
    except Exception as error:  # reported per configuration, not raised
        result.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return result


# ---- the memory-bound kernels' shape at the widths of real models -----------------------------

# The row widths the memory-bound kernels are checked at: DiT-XL/2 (1152), SD3 (1536), SD3.5
# Large (2432), Flux (3072), the SLT (384) and 4096; bias_gelu_tanh at each one's MLP width
# (4x). At each, every configuration the op's launcher picks there (each dtype, flag and
# autotune option: `Op.triton_launches`) must:
CHECK_WIDTHS = (1152, 1536, 2432, 3072, 384, 4096)
MLP_RATIO = {"bias_gelu_tanh": 4}
MIN_USEFUL_LANES = 0.85  # have this share of its lanes hold data in every access,
# move its rows in 128-bit accesses (all but KernelConfig.row_scalars per row), compile for
# sm_80 and sm_90 without spills, and as a backward with per-sample partial sums, launch at
# least GRID_FILL x SM_COUNT programs at every split of FULL_GRID_ROWS rows into (B, N):
SM_COUNT = 132  # an H100 SXM
GRID_FILL = 2
FULL_GRID_ROWS = 8192
GRID_SPLITS = ((1, FULL_GRID_ROWS), (8, 1024), (32, 256), (FULL_GRID_ROWS, 1))


def global_accesses(ptx: str) -> list[int]:
    """Bits moved by each global load and store instruction in a PTX listing."""
    bits = []
    for op in re.findall(r"\b(?:ld|st)\.global\S*", ptx):
        lanes = re.search(r"\.v(\d)", op)
        width = re.findall(r"\.[bfsu](\d+)\b", op)
        bits.append((int(lanes.group(1)) if lanes else 1) * int(width[-1]))
    return bits


def memory_bound_launches():
    """(op name, Launch) for every launch the memory-bound ops' launchers pick at the widths
    above (a configuration picked at several widths is listed at each)."""
    from .dispatch import OPS

    for name, op in OPS.items():
        launches = getattr(op, "triton_launches", None)
        if launches is None:
            continue
        for width in CHECK_WIDTHS:
            for launch in launches(width * MLP_RATIO.get(name, 1)):
                yield name, launch


def vector_problem(config, scalars: int, compiled=None) -> tuple[str, str]:
    """(name, problem or ""): every global access of the sm_90 PTX (compiled with every
    pointer, size and stride divisible by 16, as Triton's JIT specialises them at these
    widths) is 128 bits wide except the kernel's per-row scalars (`scalars` of them)."""
    try:
        compiled = compiled or compile_config(config, 90, aligned=True)
        bits = global_accesses(compiled.asm["ptx"])
    except Exception as error:  # reported per configuration
        return config.name, f"{type(error).__name__}: {error}".splitlines()[0][:300]
    narrow = [b for b in bits if b != 128]
    share = sum(b for b in bits if b == 128) / max(1, sum(bits))
    summary = f"{len(bits) - len(narrow)}/{len(bits)} accesses 128-bit ({share:.0%} of bits)"
    if len(narrow) > scalars or not bits:
        return config.name, f"{summary}; narrow: {sorted(narrow)} (allowed: {scalars} scalars)"
    return config.name, ""


def lanes_problem(launch) -> str:
    share = launch.useful_lanes
    if share < MIN_USEFUL_LANES:
        return (f"{share:.0%} of the lanes useful at width {launch.width} (tile "
                f"{launch.tile_width}; at least {MIN_USEFUL_LANES:.0%})")
    return ""


def grid_problem(launch) -> str:
    if launch.programs is None:
        return ""
    least = GRID_FILL * SM_COUNT
    small = {(B, N): launch.programs(B, N) for B, N in GRID_SPLITS
             if launch.programs(B, N) < least}
    if small:
        return (f"the backward launches {small} programs at (B, N) = {list(small)}, fewer "
                f"than {GRID_FILL} x {SM_COUNT} SMs = {least}")
    return ""


def spill_problem(config, arch: int, compiled=None) -> str:
    """Spill stores of the configuration as it is compiled at these widths (aligned)."""
    try:
        compiled = compiled or compile_config(config, arch, aligned=True)
        spills, _ = _assemble(compiled.asm["ptx"], arch)
    except subprocess.CalledProcessError as error:
        return f"ptxas failed: {error.stderr.strip()[:300]}"
    except Exception as error:  # reported per configuration
        return f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return f"sm_{arch}: {spills} bytes of spill stores" if spills else ""


def compiled_problems(config) -> list[str]:
    """The checks of a configuration's code: 128-bit accesses (sm_90) and spills (sm_80,
    sm_90), compiled as at the widths above."""
    try:
        compiled = compile_config(config, 90, aligned=True)
    except Exception as error:  # reported per configuration
        return [f"compile: {type(error).__name__}: {error}".splitlines()[0][:300]]
    problems = [vector_problem(config, (config.row_scalars or 0) + config.chunk_vectors,
                               compiled)[1],
                spill_problem(config, 90, compiled), spill_problem(config, 80)]
    return [p for p in problems if p]


def launch_problems(launch, compiled: list[str] | None = None) -> list[str]:
    """Every check above that this launch fails (empty if none); `compiled`: its
    configuration's compiled_problems where already known."""
    problems = [p for p in (lanes_problem(launch), grid_problem(launch)) if p]
    return problems + (compiled_problems(launch.config) if compiled is None else compiled)


def _compiled_problems_of(index: int) -> list[str]:
    return compiled_problems(_unique_configs()[index])


def _unique_configs() -> list:
    """The distinct configurations among the memory-bound launches (one compile each)."""
    unique = {}
    for _, launch in memory_bound_launches():
        unique.setdefault(launch.config.name, launch.config)
    return list(unique.values())


def check_memory_bound(jobs: int) -> list[tuple[str, list[str]]]:
    """(label, problems) of every memory-bound launch."""
    configs = _unique_configs()
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        compiled = dict(zip((c.name for c in configs),
                            pool.map(_compiled_problems_of, range(len(configs)))))
    return [(f"{launch.config.name} at width {launch.width}",
             launch_problems(launch, compiled[launch.config.name]))
            for _, launch in memory_bound_launches()]


# ---- the CUDA C++ memory-bound kernels (libonestep_cuda.so, built by nvcc) -----------------

# What the CUDA launchers pick: csrc/cuda/rows.cuh's RowTile::plan, called through the
# library's onestep_cuda_row_tile (a host function: no GPU needed). The forwards hold a row in
# registers (at most 8 vectors per thread); the backwards and bias+GELU walk it (any number).
CUDA_FWD_VECTORS = 8
CUDA_WALK_VECTORS = 1 << 30
CUDA_BWD_ROWS = 16  # rows per backward block (csrc/cuda/*.cu's kBwdRows)
CUDA_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# The CUDA kernels (mangled-name fragments) that move rows, with the narrow (not 128-bit)
# global accesses each may make besides its 16-byte vectors: the forwards store a row's mean
# and rstd, the LayerNorm backwards load them. Their one-element-per-vector instantiations
# (template argument 1: rows whose width or pointers do not allow 16-byte vectors) and the
# partial sums' reduction (fp32, one element per thread, 1/16 of a backward's traffic) are
# not held to 128 bits.
CUDA_ROW_KERNELS = {"16lnmod_fwd_kernel": 2, "16lnmod_bwd_kernel": 2, "18grlnmod_fwd_kernel": 2,
                    "18grlnmod_bwd_kernel": 2, "25bias_gelu_tanh_fwd_kernel": 0,
                    "25bias_gelu_tanh_bwd_kernel": 0}


# The mangled template arguments of a one-element instantiation: <T, 1, ...>.
ONE_ELEMENT = r"I(?:13__nv_bfloat16|6__half|f)Li1E"


def cuda_row_tile(width: int, element_bytes: int, max_vectors: int) -> tuple[int, int, int]:
    """(threads per row, vectors per thread, elements per vector) of the CUDA launchers' tile
    for rows of `width` elements moved in 16-byte vectors."""
    import ctypes

    from . import native

    lib = native.cuda_library()
    out = (ctypes.c_int32 * 3)()
    lib.onestep_cuda_row_tile(ctypes.c_int64(width), ctypes.c_int32(16 // element_bytes),
                              ctypes.c_int32(max_vectors), out)
    return tuple(out)


def cuda_lanes_problem(width: int, tile: tuple[int, int, int]) -> str:
    columns, vectors, elements = tile
    if columns == 0:
        return f"no tile takes width {width}"
    share = width / (columns * vectors * elements)
    if share < MIN_USEFUL_LANES:
        return (f"{share:.0%} of the lanes useful at width {width} ({columns} threads x "
                f"{vectors} vectors of {elements}; at least {MIN_USEFUL_LANES:.0%})")
    return ""


def cuda_grid_problem(programs) -> str:
    least = GRID_FILL * SM_COUNT
    small = {split: programs(*split) for split in GRID_SPLITS if programs(*split) < least}
    return (f"the backward launches {small} blocks at (B, N) = {list(small)}, fewer than "
            f"{GRID_FILL} x {SM_COUNT} SMs = {least}") if small else ""


def sass_accesses(sass: str) -> dict[str, list[int]]:
    """Bits moved by each global load and store of every function in a cuobjdump -sass
    listing (LDG.E = 32 bits, .64 / .128 / .U16 as named)."""
    functions = {}
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    for name, body in zip(parts[1::2], parts[2::2]):
        bits = []
        for op in re.findall(r"\b(?:LDG|STG)\.E[.A-Z0-9]*", body):
            size = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
            bits.append({"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}.get(
                size.group(1) if size else "", 32))
        functions[name] = bits
    return functions


def cuda_sass_problems(sass: str, one_element_too: bool = False) -> dict[str, str]:
    """Kernel name -> problem (or "") for every row kernel's 16-byte instantiation (and, with
    `one_element_too`, its one-element ones: what the check would say of a kernel without
    vectors)."""
    problems = {}
    for name, bits in sass_accesses(sass).items():
        kernel = next((k for k in CUDA_ROW_KERNELS if k in name), None)
        one_element = kernel is not None and re.search(kernel + ONE_ELEMENT, name)
        if kernel is None or (one_element and not one_element_too):
            continue  # not a row kernel, or its one-element instantiation
        narrow = [b for b in bits if b != 128]
        allowed = CUDA_ROW_KERNELS[kernel]
        problems[name] = (f"{len(bits) - len(narrow)}/{len(bits)} accesses 128-bit; narrow: "
                          f"{sorted(narrow)} (allowed: {allowed})"
                          if len(narrow) > allowed or not bits else "")
    return problems


def _cuobjdump(option: str) -> str:
    from pathlib import Path as _Path

    import triton

    from . import native

    tool = _Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), option, "-arch", "sm_90", str(native.CUDA_LIBRARY_PATH)],
                          capture_output=True, text=True, check=True).stdout


def check_cuda() -> list[tuple[str, list[str]]]:
    """(label, problems) of the CUDA launches at CHECK_WIDTHS and of the row kernels' code
    (sm_90 SASS: 16-byte accesses; resource usage: no stack, no local memory)."""
    from . import native

    if native.cuda_library() is None:
        return [("cuda", ["libonestep_cuda.so is not built (no nvcc at install time)"])]
    checked = []
    for width in CHECK_WIDTHS:
        for dtype, size in CUDA_ELEMENT_BYTES.items():
            for kind, max_vectors, row in (
                    ("layernorm forward", CUDA_FWD_VECTORS, width),
                    ("layernorm backward", CUDA_WALK_VECTORS, width),
                    ("bias_gelu_tanh", CUDA_WALK_VECTORS, width * MLP_RATIO["bias_gelu_tanh"])):
                tile = cuda_row_tile(row, size, max_vectors)
                problems = [cuda_lanes_problem(row, tile)]
                if kind == "layernorm backward":
                    problems.append(cuda_grid_problem(
                        lambda B, N: B * -(-N // CUDA_BWD_ROWS)))
                checked.append((f"cuda {kind}[{dtype}] at width {row} (tile {tile[0]} x "
                                f"{tile[1]} x {tile[2]})", [p for p in problems if p]))
    for name, problem in sorted(cuda_sass_problems(_cuobjdump("-sass")).items()):
        checked.append((f"cuda sm_90 {name}", [problem] if problem else []))
    usage = re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)",
                       _cuobjdump("--dump-resource-usage"))
    spilled = [f"{name}: {u}" for name, u in usage if not ("STACK:0 " in u and
                                                            u.endswith("LOCAL:0"))]
    checked.append((f"cuda sm_90 resource usage of {len(usage)} kernels", spilled))
    return checked


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
    parser.add_argument("--memory-bound", "--vectors", action="store_true",
                        dest="memory_bound",
                        help="instead: check what the memory-bound ops' launchers pick at the "
                             "widths of real models (useful lanes, 128-bit accesses, spills, "
                             "the backward's grid)")
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
    if args.memory_bound:
        checked = check_memory_bound(args.jobs) + check_cuda()
        for label, problems in checked:
            print(f"{label}: {'; '.join(problems) or 'ok'}")
        failed = sum(1 for _, problems in checked if problems)
        print(f"{len(checked) - failed} passed, {failed} failed")
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
