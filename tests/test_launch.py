"""The cached Triton launcher (onestep_kernels.launch): which calls reuse a compiled kernel,
checked on the CPU with a stand-in kernel; on a GPU, repeated launches of the real kernels
compute what the first one does."""

import pytest
import torch
from conftest import GPU

from onestep_kernels import launch

pytest.importorskip("triton", reason="triton is not installed")


class _Compiled:
    """Stands in for Triton's CompiledKernel: records the launches made through it."""

    function = object()

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *values: self.launches.append((grid, values))


class _Kernel:
    """Stands in for a JITFunction over (X, Y, n, BLOCK): compiles once per call through it."""

    arg_names = ["X", "Y", "n", "BLOCK"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return _Compiled()
        return run


def test_a_repeated_signature_launches_the_compiled_kernel_directly():
    kernel = _Kernel()
    runner = launch.Launcher(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    first = runner[(4,)](x, y, 64, BLOCK=16, num_warps=2)
    assert len(kernel.calls) == 1 and runner.through_triton == 1
    x2, y2 = torch.ones(64), torch.ones(64)  # other tensors, the same signature
    again = runner[(8, 2)](x2, y2, 128, BLOCK=16, num_warps=2)
    assert again is first and len(kernel.calls) == 1 and runner.direct == 1
    grid, values = first.launches[-1]
    assert grid == (8, 2, 1)
    assert values[:3] == (x2, y2, 128) and values[3] == 16  # every parameter, in order


@pytest.mark.parametrize("change", ["misaligned", "dtype", "not divisible by 16", "one",
                                    "64-bit", "constexpr", "warps"])
def test_anything_triton_specialises_on_compiles_anew(change):
    kernel = _Kernel()
    runner = launch.Launcher(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    runner[(1,)](x, y, 64, BLOCK=16, num_warps=2)
    args, kwargs = [x, y, 64], {"BLOCK": 16, "num_warps": 2}
    if change == "misaligned":
        args[0] = torch.zeros(65)[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[1] = torch.zeros(64, dtype=torch.float64)
    elif change == "not divisible by 16":
        args[2] = 65
    elif change == "one":
        args[2] = 1
    elif change == "64-bit":
        args[2] = 2**33
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    else:
        kwargs["num_warps"] = 4
    runner[(1,)](*args, **kwargs)
    assert len(kernel.calls) == 2 and runner.direct == 0


def test_a_grid_function_sees_every_argument_by_name():
    kernel = _Kernel()
    runner = launch.Launcher(kernel)
    x = torch.zeros(64)
    seen = []

    def grid(meta):
        seen.append(meta)
        return (meta["n"] // meta["BLOCK"],)

    compiled = runner[grid](x, x, 64, BLOCK=16)
    runner[grid](x, x, 96, BLOCK=16)
    assert seen[-1] == {"X": x, "Y": x, "n": 96, "BLOCK": 16}
    assert compiled.launches[-1][0] == (6, 1, 1)


def test_under_the_interpreter_the_kernel_itself_is_launched(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = _Kernel()
    assert launch.launcher(kernel) is kernel


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the launches are real there")
def test_repeated_launches_on_the_gpu_compute_what_the_first_did():
    """The second and third calls of each Triton op go through the cached compiled kernel
    (fresh inputs, the same signature) and agree with the reference as the first does."""
    import onestep_kernels as ok
    from onestep_kernels.ops import layernorm_modulate as lnm

    torch.manual_seed(0)
    errors = []
    for _ in range(3):
        x = torch.randn(3, 37, 200, device="cuda", dtype=torch.bfloat16)
        shift, scale = (torch.randn(3, 200, device="cuda", dtype=torch.bfloat16) for _ in "ab")
        out = ok.layernorm_modulate(x, shift, scale, backend="triton")
        want = lnm.reference(x.double(), shift.double(), scale.double())
        errors.append(((out.double() - want).norm() / want.norm()).item())
        u, b = torch.randn(70, 300, device="cuda"), torch.randn(300, device="cuda")
        got = ok.bias_gelu_tanh(u, b, backend="triton")
        ref = torch.nn.functional.gelu(u.double() + b.double(), approximate="tanh")
        errors.append(((got.double() - ref).norm() / ref.norm()).item())
    assert max(errors) < 1e-2, errors
    direct = sum(r.direct for r in launch._LAUNCHERS.values())
    assert direct >= 4, "the repeated calls did not take the cached path"
