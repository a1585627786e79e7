"""The compiled libraries: the CPU module's instruction sets, and the CUDA library's kernels
(resource usage read from the binary: no stack, no local memory, i.e. no spills) and C ABI."""

import ctypes
import re
import shutil
import struct
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


def cuobjdump_report(option: str) -> str:
    """cuobjdump's `option` report of the CUDA library (the test skips without cuobjdump)."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither in the triton wheel nor on PATH)")
    return subprocess.run([tool, option, str(native.CUDA_LIBRARY_PATH)],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not native.CUDA_LIBRARY_PATH.exists(), reason=NOT_BUILT)
def test_cuda_kernels_have_no_spills_for_sm80_and_sm90():
    report = cuobjdump_report("--dump-resource-usage")
    archs = set(re.findall(r"arch = (sm_\d+)", report))
    assert {"sm_80", "sm_90"} <= archs, report[:2000]
    functions = re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", report)
    assert len(functions) >= 6, report[:2000]
    for name, usage in functions:
        assert "STACK:0 " in usage and usage.endswith("LOCAL:0"), f"{name}: {usage}"


@pytest.mark.skipif(not native.CUDA_LIBRARY_PATH.exists(), reason=NOT_BUILT)
def test_cuda_library_embeds_ptx_for_newer_gpus():
    listing = cuobjdump_report("--list-ptx")
    assert re.search(r"sm_\d+\.ptx|compute_\d+", listing), listing[:2000]


def ln_params(**changes):
    fields = dict(x=0, shift=0, scale=0, out=0, mean=0, rstd=0, B=1, N=1, D=8, x_sb=8, x_sn=8,
                  shift_sb=0, shift_sn=0, scale_sb=0, scale_sn=0, eps=1e-6, dtype=0)
    return native.params_type("LayerNormModulateFwdParams")(**{**fields, **changes})


@pytest.mark.skipif(not native.CUDA_LIBRARY_PATH.exists(), reason=NOT_BUILT)
def test_cuda_library_loads_and_rejects_bad_arguments_without_a_gpu():
    lib = native.cuda_library()  # its params layout is checked against the CPU module's here
    run = native._cuda_function("layernorm_modulate_fwd")
    # A bad dtype code and a bad size are refused before anything touches the GPU.
    assert run(ln_params(dtype=7), None) == 1
    assert run(ln_params(D=0), None) == 2
    assert lib.onestep_cuda_status_string(2).decode() == "invalid size or stride"
    assert native._cuda_layout(lib) == native.cpu_module.params_layout()


def test_params_mirrors_match_the_compiled_layout():
    """Every struct of csrc/common/params.h has a ctypes mirror with the library's offsets,
    and every launcher the CPU module exports takes one of them."""
    structs = native.params_types()
    header = (Path(__file__).resolve().parent.parent / "csrc/common/params.h").read_text()
    declared = header[header.index("#define ONESTEP_LAUNCHERS(X)"):]
    declared = declared[:declared.index("\n\n")]
    launchers = dict(re.findall(r"X\((\w+), (\w+Params)\)", declared))
    assert launchers and set(launchers.values()) == set(structs)
    layout = native.cpu_module.params_layout()
    for name, make in structs.items():
        assert f"{name} {ctypes.sizeof(make.struct)}|" in layout
    for launcher in launchers:
        assert callable(getattr(native.cpu_module, launcher)), launcher


def test_packed_params_are_the_structs_bytes():
    """The packed bytes equal ctypes' own struct filled with the same values, field by field
    (random values, every struct), and a buffer of the wrong size is refused."""
    import random

    rng = random.Random(0)
    for name, make in native.params_types().items():
        values = {}
        for field, kind in make.struct._fields_:
            if kind is ctypes.c_float:
                values[field] = ctypes.c_float(rng.uniform(-1, 1)).value
            elif kind is ctypes.c_void_p:
                values[field] = rng.randrange(2**47)
            else:
                bits = 8 * ctypes.sizeof(kind) - 1
                values[field] = rng.randrange(-2**bits, 2**bits)
        assert make(**values) == bytes(make.struct(**values)), name
    assert native.cpu_module.layernorm_modulate_fwd(ln_params()[:-4], 1) == 5


def test_a_layout_mismatch_is_refused():
    good = "P 16|a:0:int64_t|b:8:float*;"
    assert ctypes.sizeof(native.params_from_layout(good)["P"].struct) == 16
    with pytest.raises(RuntimeError, match=r"P\.b: at offset 12"):
        native.params_from_layout("P 16|a:0:int64_t|b:12:float*;")
    with pytest.raises(RuntimeError, match="P: 24 bytes in the library"):
        native.params_from_layout("P 24|a:0:int64_t|b:8:float*;")


def test_a_missing_field_is_an_error_not_a_zero():
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'eps'"):
        fields = dict(x=0, shift=0, scale=0, out=0, mean=0, rstd=0, B=1, N=1, D=8, x_sb=8,
                      x_sn=8, shift_sb=0, shift_sn=0, scale_sb=0, scale_sn=0, dtype=0)
        native.params_type("LayerNormModulateFwdParams")(**fields)


def test_positional_params_check_their_field_names_and_pack_the_same_bytes():
    names = ("x shift scale out mean rstd B N D x_sb x_sn shift_sb shift_sn scale_sb scale_sn "
             "eps dtype")
    make = native.positional_params("LayerNormModulateFwdParams", names)
    values = dict(zip(names.split(), [11, 12, 13, 14, 15, 16, 2, 3, 8, 24, 8, 8, 0, 8, 0, 0.5, 2],
                      strict=True))
    assert make(*values.values()) == native.params_type("LayerNormModulateFwdParams")(**values)
    swapped = names.replace("shift scale", "scale shift")
    with pytest.raises(ValueError, match="fields: LayerNormModulateFwdParams has fields"):
        native.positional_params("LayerNormModulateFwdParams", swapped)
    with pytest.raises(struct.error):  # a value missing
        make(*list(values.values())[:-1])


def test_cpu_launchers_refuse_bad_codes():
    from onestep_kernels.native import cpu_module

    assert cpu_module.layernorm_modulate_fwd(ln_params(dtype=9), 1) == 1
    assert cpu_module.layernorm_modulate_fwd(ln_params(D=0), 1) == 2
