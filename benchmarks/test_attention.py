"""Attention on the CPU at DiT shapes (B=8, N=256 tokens; DiT-S: 6 heads of 64, DiT-B: 12 heads
of 64), fp32, forward (inference) and forward + backward (training): eager (the explicit
softmax(q k^T) v with the N x N scores), torch.compile of it, PyTorch's
scaled_dot_product_attention (its CPU flash-attention kernel; onestep's torch backend) and
onestep's CPU C++ kernel, as GFLOP/s of the matrix products next to a large SGEMM's rate
measured in the same run.

    pytest benchmarks/test_attention.py
"""

import pytest
import torch
from conftest import measure_sgemm_ceiling
from einops import rearrange

import onestep_kernels as ok
from onestep_kernels.ops.attention import reference

B, N, HEAD_DIM = 8, 256, 64
HEADS = {"DiT-S": 6, "DiT-B": 12}


def eager(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(-1) @ v


_compiled = torch.compile(eager, dynamic=False)
CONTENDERS = {
    "eager": eager,
    "torch.compile": _compiled,
    "PyTorch SDPA": lambda q, k, v: ok.attention(q, k, v, backend="sdpa"),
    "onestep cpu (C++)": lambda q, k, v: ok.attention(q, k, v, backend="cpu"),
}


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("size", list(HEADS))
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_attention(benchmark, record, contender, size, mode):
    g = torch.Generator().manual_seed(3)
    H = HEADS[size]
    # q, k, v as views of one QKV projection's output, as a DiT block hands them over.
    qkv = torch.randn(B, N, 3 * H * HEAD_DIM, generator=g)
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=H)
    fn = CONTENDERS[contender]
    with torch.no_grad():
        torch.testing.assert_close(fn(q, k, v), reference(q, k, v), rtol=1e-4, atol=1e-4)
    flops = 2 * 2 * B * H * N * N * HEAD_DIM  # Q K^T and P V
    if mode == "inference":
        def step():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        dout = torch.randn(B, H, N, HEAD_DIM, generator=g)

        def step():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(dout)
        flops *= 3  # the backward's four products (dV, dP, dQ, dK) count twice the forward's
    benchmark.group = f"attention {size} {mode}"
    benchmark(step)
    record(f"attention {size} (B={B}, H={H}, N={N}, Dh={HEAD_DIM}) fp32 {mode}", contender,
           flops, "GFLOP/s")


def test_sgemm_ceiling(benchmark, record):
    measure_sgemm_ceiling(benchmark, record)
