"""Test-session setup: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET is read when the kernels are decorated, so it is set before onestep_kernels
is imported. The interpreter mishandles bfloat16, so Triton is tested in fp32/fp16 here; the
compile check (tests/test_aot.py) covers bf16 for sm_80/sm_90.
"""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# ‖out − ref‖ / ‖ref‖ bounds against a float64 reference, by the dtype under test.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed)"
    if ref.abs().max() == 0:  # an exactly-zero gradient (e.g. attention over one key): absolute
        err = out.double().abs().max().item()
        assert err <= REL_TOL[dtype], f"{what}: expected zeros, max |value| {err:.3g}"
        return
    err = rel_error(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:g} ({dtype})"


@pytest.fixture
def generator(request):
    """A generator seeded from the test's id: different inputs for every case, the same ones
    on every run. ONESTEP_TEST_SEED=<int> mixes in another seed to explore."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("ONESTEP_TEST_SEED", "0"))
    return torch.Generator().manual_seed(seed)
