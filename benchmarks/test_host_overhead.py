"""Host time per call on tiny tensors, where the kernels' own time is negligible: each fused
op without and with autograd, beside F.layer_norm and `x + 1` in the same run (the issue's
target: at most 3x F.layer_norm), and FusedDiTBlock beside the reference DiTBlock. Rates are
calls per second (higher is better); the ms column is the time per call. On a CUDA machine
the same rows run on CUDA tensors (the host's enqueue time, no synchronisation).

    pytest benchmarks/test_host_overhead.py
"""

import pytest
import torch
import torch.nn.functional as F

import onestep_kernels as ok
from onestep_kernels.layers import DiTBlock, FusedDiTBlock

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, N, D, H = 2, 3, 16, 2


def tiny(*shape, grad=False):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(shape, generator=g).to(DEVICE).requires_grad_(grad)


def calls(grad):
    x, y = tiny(B, N, D, grad=grad), tiny(B, N, D)
    shift, scale, gate = tiny(B, D), tiny(B, D), tiny(B, D)
    q = tiny(1, H, N, D, grad=grad)
    bias = tiny(D)
    return {
        "x + 1": lambda: x + 1,
        "F.layer_norm": lambda: F.layer_norm(x, (D,)),
        "layernorm_modulate": lambda: ok.layernorm_modulate(x, shift, scale),
        "gated_residual_layernorm_modulate":
            lambda: ok.gated_residual_layernorm_modulate(x, y, gate, shift, scale),
        "bias_gelu_tanh": lambda: ok.bias_gelu_tanh(x, bias),
        "attention": lambda: ok.attention(q, q, q),
    }


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("name", list(calls(False)))
def test_op_call(benchmark, record, name, grad):
    fn = calls(grad)[name]
    fn()
    benchmark.group = f"host time per call ({'autograd' if grad else 'no grad'}, {DEVICE})"
    benchmark(fn)
    record(benchmark.group, name, 1e9, "calls/s")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("block", ["reference DiTBlock", "FusedDiTBlock"])
def test_block_call(benchmark, record, block, grad):
    torch.manual_seed(0)
    module = (FusedDiTBlock if block == "FusedDiTBlock" else DiTBlock)(32, 2).to(DEVICE)
    x, c = tiny(1, 4, 32, grad=grad), tiny(1, 32)
    with torch.set_grad_enabled(grad):
        module(x, c)
        benchmark.group = f"block host time per call ({'autograd' if grad else 'no grad'})"
        benchmark(module, x, c)
    record(benchmark.group, block, 1e9, "calls/s")
