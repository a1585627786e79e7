"""Test-session setup. Without a GPU, Triton kernels run on CPU tensors through the
interpreter; with one, the same tests run the GPU backends on CUDA tensors with Triton
compiled (`backend_device` is the one place that decides where a backend's tensors live).

TRITON_INTERPRET is read when the kernels are decorated, so it is set before onestep_kernels
is imported. The interpreter mishandles bfloat16, so Triton is tested in fp32/fp16 on the
CPU; the compile check (tests/test_aot.py) covers bf16 for sm_80/sm_90, and a GPU run tests it.
"""

import os
import time
import zlib

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

# ‖out − ref‖ / ‖ref‖ bounds against a float64 reference, by the dtype under test.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str,
                     torch_error: float | None = None) -> None:
    """‖out − ref‖/‖ref‖ within REL_TOL[dtype]; or, where `torch_error` (PyTorch's own error
    in the same dtype against the same reference) is given, within twice that (flash-attention's
    rule), whichever is looser. Tensors may live on any device."""
    out, ref = out.detach().cpu(), ref.detach().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed)"
    if ref.abs().max() == 0:  # an exactly-zero gradient (e.g. attention over one key): absolute
        err = out.double().abs().max().item()
        assert err <= REL_TOL[dtype], f"{what}: expected zeros, max |value| {err:.3g}"
        return
    err = rel_error(out, ref)
    bound = REL_TOL[dtype] if torch_error is None else max(REL_TOL[dtype], 2 * torch_error)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:g} ({dtype})"


@pytest.fixture
def generator(request):
    """A generator seeded from the test's id: different inputs for every case, the same ones
    on every run. ONESTEP_TEST_SEED=<int> mixes in another seed to explore."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("ONESTEP_TEST_SEED", "0"))
    return torch.Generator().manual_seed(seed)


# Triton up to 3.6 under NumPy 2.4: its interpreter fails in every kernel with a loop
# (triton-lang/triton#9171). The triton backend then reports itself unavailable and the backend
# matrix skips it; a test that asks for it by name meets that refusal (or, launching a kernel
# itself, the failure), which is a skip here too.
_INTERPRETER_FAILURE = "only 0-dimensional arrays can be converted to Python scalars"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as error:
        problem = dispatch.triton_interpret() and dispatch.interpreter_problem()
        if problem and (problem in str(error) or _INTERPRETER_FAILURE in str(error)):
            pytest.skip(problem)
        raise


# A run with a time budget (gpu_check's tests row, on a GPU lent for minutes) sets
# ONESTEP_TEST_DEADLINE, a time.time() value: tests that would start after it are skipped, so
# the run still ends by itself, with its summary and report, instead of being killed.
from onestep_gpu_check import TEST_DEADLINE_ENV, TEST_DEADLINE_SKIP  # noqa: E402

_DEADLINE = float(os.environ.get(TEST_DEADLINE_ENV) or "inf")


def pytest_runtest_setup(item):
    if time.time() > _DEADLINE:
        pytest.skip(TEST_DEADLINE_SKIP)


# ---- the backend matrix, read from the ops' own backend records -------------------------------

os.environ.setdefault("ONESTEP_PREFERENCES", "builtin")  # a user's own measurement stays out

from onestep_kernels import dispatch, native  # noqa: E402
from onestep_kernels.dispatch import OPS  # noqa: E402

TEST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend_device(backend: str | dispatch.Backend, op: str | None = None) -> torch.device:
    """The one place that says where a backend's test tensors live: on the GPU whenever there
    is one and the backend runs there (Triton compiled, not interpreted), else on the CPU
    (Triton through the interpreter)."""
    record = backend if isinstance(backend, dispatch.Backend) else OPS[op][backend]
    on_gpu = "cuda" in record.devices or record.devices == dispatch.ANY_DEVICE
    return torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")


def interpreted(record: dispatch.Backend) -> bool:
    """Whether this backend's tests run Triton through the interpreter (no GPU)."""
    return record.runtime == "triton" and backend_device(record).type == "cpu"


def to_backend(backend: str, op: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors on `backend_device(backend, op)`."""
    device = backend_device(backend, op)
    return [t.to(device) for t in tensors]


INTERPRETER_BF16 = ("the Triton interpreter computes bfloat16 wrongly (bf16 is covered by the "
                    "sm_80/sm_90 compile check here and by the suite on a GPU)")


# Backends kept only to be timed against their successors, with why the interpreter runs them in
# float32 alone.
KEPT_FOR_TIMING = {"triton_padded": "kept only to time against the chunked kernels; its code is "
                   "unchanged since the suite ran it in every dtype as `triton` (up to "
                   "2bca0d5): float32 covers it under the interpreter, a GPU run all dtypes"}


def backend_matrix(op: str, dtypes=TEST_DTYPES):
    """pytest params (backend, dtype, isa) for every backend the op declares, in every dtype;
    isa is the CPU instruction set forced for native CPU kernels (both are tested). Backends
    this machine cannot run are skipped with the reason their record gives, and so is
    bfloat16 through the Triton interpreter (which computes it wrongly; the compile check and
    a GPU run cover it, and test_dispatch checks that the call is refused); calls a record
    refuses at some width are tested to be refused."""
    cases = []
    for record in OPS[op].backends.values():
        missing = dispatch._runtime_reason(record.runtime)
        for dtype in dtypes:
            for isa in (("avx2", "base") if record.runtime == "cpu_library" else (None,)):
                marks = []
                if missing:
                    marks.append(pytest.mark.skip(reason=f"{record.name}: {missing}"))
                elif interpreted(record) and dtype == torch.bfloat16:
                    marks.append(pytest.mark.skip(reason=f"{record.name}: {INTERPRETER_BF16}"))
                elif interpreted(record) and record.name in KEPT_FOR_TIMING and (
                        dtype != torch.float32):
                    why = KEPT_FOR_TIMING[record.name]
                    marks.append(pytest.mark.skip(reason=f"{record.name}: {why}"))
                elif interpreted(record):
                    marks.append(pytest.mark.slow)  # the interpreter
                name = f"{record.name}-{isa}" if isa else record.name
                cases.append(pytest.param(record.name, dtype, isa, marks=marks,
                                          id=f"{name}-{str(dtype)[6:]}"))
    return cases


# The Triton interpreter runs every program in NumPy: a float64-reference case of (3, 257) or
# (257, 3) rows took 9-14 s there, and such cases were most of the suite's time. Under the
# interpreter the long side is 33 rows instead: still several 16-row backward chunks and a
# remainder, as 257 has (the interpreter checks indexing and masking; a row's width, kept,
# decides those). Compiled backends, and Triton on a GPU, keep 257.
INTERPRETED_LONG_SIDE = 33
# ... and 9 at rows of 2048 and wider, which the chunked LayerNorm kernels walk in 16 or more
# chunks per pass (a case of 4096 x 33 rows took 10-16 s): still a program's rows and a
# remainder, and the long side's layout.
INTERPRETED_WIDE_ROW = 2048
INTERPRETED_WIDE_LONG_SIDE = 9
# ... and 9 samples: the chunked kernels' programs each take rows of one sample, so (33, 3)
# rows were 33 programs of 3 rows each (4-6 s a case), where 9 samples check the same.
INTERPRETED_SAMPLES = 9


def reference_rows(op: str, backend: str, B: int, N: int, width: int = 0) -> tuple[int, int]:
    """(B, N) for a float64-reference case of `backend` over rows of `width`: the long side
    shortened to INTERPRETED_LONG_SIDE (INTERPRETED_WIDE_LONG_SIDE for wide rows) where Triton
    runs through the interpreter."""
    if interpreted(OPS[op][backend]):
        side = (INTERPRETED_WIDE_LONG_SIDE if width >= INTERPRETED_WIDE_ROW
                else INTERPRETED_LONG_SIDE)
        return min(B, side, INTERPRETED_SAMPLES), min(N, side)
    return B, N


def refused(op: str, backend: str, device: torch.device, dtype: torch.dtype, width: int,
            needs_grad: bool = True) -> str | None:
    """The reason `backend`'s record gives for not taking such a call, or None."""
    return OPS[op].reason(backend, device, dtype, width, needs_grad)


@pytest.fixture
def cpu_isa(monkeypatch):
    """cpu_isa("avx2" | "base" | None): force the native CPU kernels' instruction set."""
    def force(isa):
        if isa == "avx2" and not native.cpu_module.has_avx2_build():
            pytest.skip("this build has no avx2 variant of the CPU kernels (not an x86-64 host)")
        if isa is not None:
            monkeypatch.setenv("ONESTEP_CPU_ISA", isa)
        if isa == "avx2" and native.cpu_module.active_isa() != "avx2":
            pytest.skip("this processor lacks AVX2/FMA/F16C")
    return force


# ---- launching a backend's kernels directly, on poisoned outputs ------------------------------


def poisoned_forward(op: str, backend: str, args: tuple) -> tuple:
    """Every output of `backend`'s forward launcher on `args` (inputs, then params), written
    into buffers filled with NaN first: an element a kernel forgets to write stays NaN."""
    spec = OPS[op].spec
    outputs = tuple(t if t is None else t.fill_(float("nan"))
                    for t in spec.allocate(backend, True, *args))
    return OPS[op].forward(OPS[op][backend], *args, keep=True, outputs=outputs)


def poisoned_backward(op: str, backend: str, output_grads: tuple, saved: tuple,
                      params: tuple) -> tuple:
    """The gradient buffers of `backend`'s backward launcher, NaN before the launch."""
    spec = OPS[op].spec
    buffers = tuple(t.fill_(float("nan")) for t in spec.allocate_grads(*saved, *params))
    return OPS[op].backward(OPS[op][backend], output_grads, saved, params, buffers=buffers)
