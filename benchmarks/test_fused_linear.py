"""fused_linear on a GPU, bf16, DiT-XL/2 widths (D=1152, MLP 4608), B=32 images x N=256 tokens,
inference, for the three ways a DiT block uses it: QKV (modulated LayerNorm in the prologue),
fc1 (prologue and GELU) and fc2 (gated residual in the epilogue). Contenders in one run: eager
PyTorch (the steps as separate PyTorch ops), torch.compile of that, onestep's separate ops
(layernorm_modulate / bias_gelu_tanh / addcmul around cuBLAS, as FusedDiTBlock runs by default)
and onestep's fused_linear; rates are TFLOP/s of the matrix product, next to cuBLAS's bf16
product of the same shape alone in the same run (the rate the fusion would reach if the
neighbouring steps cost nothing).

    pytest benchmarks/test_fused_linear.py

Needs a CUDA device; skipped elsewhere (the kernel runs on the CPU only through the Triton
interpreter). No GPU has run it yet.
"""

import pytest
import torch
import torch.nn.functional as F

import onestep_kernels as ok

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: the fused kernel runs here only through the Triton interpreter")

B, N, D = 32, 256, 1152
# name -> (K, M_out, modulated LayerNorm before, GELU, gated residual after)
CASES = {"QKV": (D, 3 * D, True, False, False), "fc1": (D, 4 * D, True, True, False),
         "fc2": (4 * D, D, False, False, True)}


def eager(x, weight, bias, shift=None, scale=None, activation=None, gate=None, residual=None):
    h = x
    if shift is not None:
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    y = F.linear(h, weight, bias)
    if activation is not None:
        y = F.gelu(y, approximate="tanh")
    if gate is not None:
        y = residual + gate[:, None] * y
    return y


def separate_ops(x, weight, bias, shift=None, scale=None, activation=None, gate=None,
                 residual=None):
    h = x if shift is None else ok.layernorm_modulate(x, shift, scale)
    if activation is not None:
        y = ok.bias_gelu_tanh(F.linear(h, weight), bias)
    else:
        y = F.linear(h, weight, bias)
    return y if gate is None else torch.addcmul(residual, gate[:, None], y)


CONTENDERS = {"eager": eager, "torch.compile": torch.compile(eager, dynamic=False),
              "onestep separate ops": separate_ops,
              "onestep fused_linear": lambda **args: ok.fused_linear(**args, backend="triton")}


def make(case):
    K, M, norm, gelu, gated = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*size, mul=1.0):
        return (torch.randn(size, generator=g, device="cuda") * mul).to(torch.bfloat16)

    args = {"x": rand(B, N, K), "weight": rand(M, K, mul=K ** -0.5), "bias": rand(M)}
    if norm:
        args.update(shift=rand(B, K), scale=rand(B, K, mul=0.1))
    if gelu:
        args["activation"] = "gelu_tanh"
    if gated:
        args.update(gate=rand(B, M), residual=rand(B, N, M))
    return args


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_fused_linear(benchmark, record, contender, case):
    args = make(case)
    fn = CONTENDERS[contender]
    with torch.no_grad():
        expected = eager(**{k: v.float() if isinstance(v, torch.Tensor) else v
                            for k, v in args.items()})
        torch.testing.assert_close(fn(**args).float(), expected, rtol=3e-2, atol=3e-2)

        def step():
            fn(**args)
            torch.cuda.synchronize()

        benchmark.group = f"fused_linear {case}"
        benchmark(step)
    K, M = CASES[case][:2]
    record(f"fused_linear {case} (B={B}, N={N}, K={K}, M_out={M}) bf16 inference", contender,
           2 * B * N * K * M, "GFLOP/s")


@pytest.mark.parametrize("case", list(CASES))
def test_cublas_ceiling(benchmark, record, case):
    """The same matrix product alone (cuBLAS, bf16, into an existing buffer)."""
    K, M = CASES[case][:2]
    args = make(case)
    a, w = args["x"].reshape(B * N, K), args["weight"]
    out = torch.empty(B * N, M, device="cuda", dtype=torch.bfloat16)

    def step():
        torch.mm(a, w.t(), out=out)
        torch.cuda.synchronize()

    benchmark.group = "ceiling"
    benchmark(step)
    record("ceiling", f"cuBLAS bf16 {case} product", 2 * B * N * K * M, "GFLOP/s")
