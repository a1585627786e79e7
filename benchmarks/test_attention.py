"""Attention on the CPU at DiT shapes (B=8, N=256 tokens; DiT-S: 6 heads of 64, DiT-B: 12 heads
of 64), fp32, forward: eager (the explicit softmax(q k^T) v with the N x N scores), torch.compile
of it, and onestep's cpu backend (PyTorch's SDPA), as GFLOP/s of the two matrix products next
to a large SGEMM's rate measured in the same run. This is the bar a hand-written CPU kernel
would have to clear.

    pytest benchmarks/test_attention.py
"""

import pytest
import torch

import onestep_kernels as ok
from onestep_kernels.ops.attention import reference

B, N, HEAD_DIM = 8, 256, 64
HEADS = {"DiT-S": 6, "DiT-B": 12}


def eager(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(-1) @ v


_compiled = torch.compile(eager, dynamic=False)


@pytest.mark.parametrize("size", list(HEADS))
@pytest.mark.parametrize("contender", ["eager", "torch.compile", "onestep cpu (SDPA)"])
def test_attention(benchmark, record, contender, size):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, HEADS[size], N, HEAD_DIM, generator=g) for _ in range(3))
    fn = {"eager": eager, "torch.compile": _compiled,
          "onestep cpu (SDPA)": lambda q, k, v: ok.attention(q, k, v, backend="cpu")}[contender]
    with torch.no_grad():
        torch.testing.assert_close(fn(q, k, v), reference(q, k, v), rtol=1e-4, atol=1e-4)
        benchmark.group = f"attention {size}"
        benchmark(fn, q, k, v)
    flops = 2 * 2 * B * HEADS[size] * N * N * HEAD_DIM
    record(f"attention {size} (B={B}, H={HEADS[size]}, N={N}, Dh={HEAD_DIM}) fp32 forward",
           contender, flops, "GFLOP/s")
