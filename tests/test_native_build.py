"""The compiled libraries: the CPU module's instruction sets, and the CUDA library's kernels
(resource usage read from the binary: no stack, no local memory, i.e. no spills) and C ABI."""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from onestep_kernels import native

NOT_BUILT = "libonestep_cuda.so was not built here (no nvcc at install time, or ONESTEP_SKIP_CUDA=1)"


def test_cpu_module_is_built():
    assert native.cpu_module is not None, native.CPU_IMPORT_ERROR
    assert native.cpu_module.active_isa() in ("avx2", "base")


def cuobjdump() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is not None:
        path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if path.exists():
            return str(path)
    return shutil.which("cuobjdump")


@pytest.mark.skipif(not native.CUDA_LIBRARY_PATH.exists(), reason=NOT_BUILT)
def test_cuda_kernels_have_no_spills_for_sm80_and_sm90():
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither in the triton wheel nor on PATH)")
    report = subprocess.run([tool, "--dump-resource-usage", str(native.CUDA_LIBRARY_PATH)],
                            capture_output=True, text=True, check=True).stdout
    archs = set(re.findall(r"arch = (sm_\d+)", report))
    assert {"sm_80", "sm_90"} <= archs, report[:2000]
    functions = re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", report)
    assert len(functions) >= 6, report[:2000]
    for name, usage in functions:
        assert "STACK:0 " in usage and usage.endswith("LOCAL:0"), f"{name}: {usage}"


@pytest.mark.skipif(not native.CUDA_LIBRARY_PATH.exists(), reason=NOT_BUILT)
def test_cuda_library_loads_and_rejects_bad_arguments_without_a_gpu():
    lib = native.cuda_library()
    null = ctypes.c_void_p(0)
    # A bad dtype code and a bad size are refused before anything touches the GPU.
    assert lib.onestep_cuda_layernorm_modulate_fwd(
        *[null] * 6, 1, 1, 8, 8, 8, 0, 0, 0, 0, 7, 1e-6, null) == 1
    assert lib.onestep_cuda_layernorm_modulate_fwd(
        *[null] * 6, 1, 1, 0, 8, 8, 0, 0, 0, 0, 0, 1e-6, null) == 2
    assert lib.onestep_cuda_status_string(2).decode() == "invalid size or stride"
