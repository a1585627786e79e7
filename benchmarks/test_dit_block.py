"""A DiT block at DiT-S/2 and DiT-B/2 widths (B=8 images, N=256 tokens), fp32 on the CPU:
eager PyTorch (the reference block), torch.compile of it, and onestep's FusedDiTBlock, for
inference (forward under no_grad) and training (forward + backward), in one run.

Rates are GFLOP/s of the block's matrix products (QKV, attention's two products, proj, fc1,
fc2, adaLN), next to a large SGEMM's GFLOP/s measured in the same run: the SGEMM rate is the
"GEMM floor" (the time the block would take if it were nothing but those matrix products at
that rate); a contender at 1/1.3 of the SGEMM rate is within 1.3x of the floor.

    pytest benchmarks/test_dit_block.py [--allocator tuned]
"""

import copy

import pytest
import torch
from conftest import measure_sgemm_ceiling

from onestep_kernels.layers import DiTBlock, FusedDiTBlock

B, N = 8, 256
WIDTHS = {"DiT-S": (384, 6), "DiT-B": (768, 12)}


def block_flops(D: int) -> int:
    """Matrix-product FLOPs of one block forward."""
    T = B * N
    linears = 2 * T * D * (3 * D + D + 4 * D + 4 * D)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * B * N * N * D  # Q K^T and P V over all heads
    adaln = 2 * B * D * 6 * D
    return linears + attention + adaln


def make(kind: str, D: int, heads: int):
    torch.manual_seed(0)
    reference = DiTBlock(D, heads)
    with torch.no_grad():
        for p in reference.parameters():  # adaLN-Zero's zero init would make the block trivial
            p.normal_(0, 0.02)
    if kind == "onestep":
        block = FusedDiTBlock(D, heads)
        block.load_state_dict(reference.state_dict())
        return block
    if kind == "torch.compile":
        return torch.compile(copy.deepcopy(reference))
    return reference


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("size", list(WIDTHS))
@pytest.mark.parametrize("contender", ["eager", "torch.compile", "onestep"])
def test_dit_block(benchmark, record, contender, size, mode):
    D, heads = WIDTHS[size]
    block = make(contender, D, heads)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, D, generator=g)
    c = torch.randn(B, D, generator=g)

    if mode == "inference":
        def step():
            with torch.no_grad():
                return block(x, c)
        flops = block_flops(D)
    else:
        xg = x.clone().requires_grad_()

        def step():
            block.zero_grad(set_to_none=True)
            out = block(xg, c)
            out.backward(torch.ones_like(out))
            return out
        flops = 3 * block_flops(D)  # backward: two products per forward product

    reference_out = DiTBlock(D, heads)
    reference_out.load_state_dict(make("eager", D, heads).state_dict())
    with torch.no_grad():
        expected = reference_out(x, c)
    torch.testing.assert_close(step().detach(), expected, rtol=2e-4, atol=2e-4)
    benchmark.group = f"DiT block {size} {mode}"
    benchmark(step)
    record(f"DiT block {size} (D={D}) {mode}, B={B} N={N} fp32", contender, flops, "GFLOP/s")


def test_sgemm_ceiling(benchmark, record):
    measure_sgemm_ceiling(benchmark, record)
