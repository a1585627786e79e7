"""The Single-Layer Transformer's depth loop, fp32 on the CPU: onestep's SLT forward against the
same model written as a plain eager PyTorch loop over the reference block's modules (each
application's modulation from its own product, the gates scaled by the step), torch.compile
of that loop, and the loop's floor, its matrix products and attention alone, timed in the same
run (and the same products chained, each reading the one before's output: what the floor costs
with the loop's data flow); and the K-step loop against K times one application of the same
block timed alone.

Shapes: width 384 (slt-S), K = 28, 64 tokens (16 x 16 latents, patch 2), 16 candidates for the
forward and 4 for forward + backward; and the digits size (slt-tiny: width 48, K = 8, 16
tokens). Rates are GFLOP/s of the loop's matrix products and attention.

    pytest benchmarks/test_slt.py
"""

import pytest
import torch

from onestep_gpu_check.rows import (
    slt_chained_products,
    slt_eager_loop,
    slt_floor,
    slt_models,
)
from onestep_kernels.depth_loop import depth_loop

# name -> (width, heads, K, latent side, channels, candidates forward, candidates training)
SIZES = {"slt-S": (384, 6, 28, 16, 4, 16, 4), "slt-tiny": (48, 4, 8, 8, 1, 64, 64)}
# (the models, the eager loop and the floor are the GPU pass's slt row's: onestep_gpu_check)


def loop_flops(D: int, K: int, B: int, N: int) -> int:
    """Matrix-product and attention FLOPs of the K applications."""
    per = 2 * B * N * D * (3 * D + D + 4 * D + 4 * D) + 2 * 2 * B * N * N * D
    return K * per


def _models(name: str):
    D, H, K, side, C, _, _ = SIZES[name]
    return slt_models(name, side, C, "cpu", torch.float32)


def slt_calls(name: str, mode: str) -> dict:
    """Each contender of one size and mode as a call returning its output: a forward without
    gradients ("inference"), or a forward and a backward of its mean square ("training"); the
    floors (inference only) are timed, not compared. Also timed by benchmarks/slt_paired.py."""
    _, _, _, side, C, b_inference, b_training = SIZES[name]
    B = b_inference if mode == "inference" else b_training
    model, block = _models(name)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(B, C, side, side, generator=g), torch.ones(B)
    y = torch.randint(0, 10, (B,), generator=g)
    eager = slt_eager_loop(model, block)
    forwards = {"eager loop": eager, "torch.compile(eager loop)": torch.compile(eager),
                "onestep": model}
    params = [p for p in list(model.parameters()) + list(block.parameters()) if p.requires_grad]
    calls = {}
    for contender, forward in forwards.items():
        if mode == "inference":
            def call(f=forward):
                with torch.no_grad():
                    return f(x, t, y)
        else:
            def call(f=forward):
                for p in params:
                    p.grad = None
                out = f(x, t, y)
                out.square().mean().backward()
                return out.detach()
        calls[contender] = call
    if mode == "inference":
        calls["floor"] = slt_floor(model, B, (side // 2) ** 2, "cpu", torch.float32)
        calls["floor, chained"] = slt_chained_products(model, B, (side // 2) ** 2, "cpu",
                                                       torch.float32)
    return calls


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("contender", ["eager loop", "torch.compile(eager loop)", "onestep",
                                       "floor", "floor, chained"])
def test_slt_forward(benchmark, record, contender, name, mode):
    D, H, K, side, C, b_inference, b_training = SIZES[name]
    B = b_inference if mode == "inference" else b_training
    N = (side // 2) ** 2
    calls = slt_calls(name, mode)
    if contender not in calls:
        pytest.skip("the floor is the forward's (a training floor would be 3x it)")
    call = calls[contender]
    if not contender.startswith("floor"):
        expected = calls["eager loop"]()[:, :C]
        torch.testing.assert_close(call()[:, :C], expected, rtol=1e-3, atol=1e-3)
    benchmark.group = f"SLT {name} {mode}"
    benchmark(call)
    flops = loop_flops(D, K, B, N) * (1 if mode == "inference" else 3)
    record(f"SLT {name} (D={D}, K={K}, {N} tokens) {mode}, B={B} fp32", contender, flops,
           "GFLOP/s")


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("steps", ["K applications", "one application"])
def test_depth_loop_against_one_application(benchmark, record, steps, name):
    """The K-step loop and one application of the same block, forward: the loop should cost K
    times the application alone (no launch or conditioning overhead left)."""
    D, H, K, side, C, B, _ = SIZES[name]
    N = (side // 2) ** 2
    model, _ = _models(name)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(B, N, D, generator=g)
    with torch.no_grad():
        mods = model.modulations(torch.randn(B, D, generator=g))
    mods = mods if steps == "K applications" else mods[:1].contiguous()
    block = model.block

    def call():
        with torch.no_grad():
            return depth_loop(h, mods, block.attn, block.mlp.fc1, block.mlp.fc2)

    benchmark.group = f"SLT {name} depth loop"
    benchmark(call)
    record(f"SLT {name} depth loop, B={B} (per application)", steps,
           loop_flops(D, 1, B, N) * mods.shape[0], "GFLOP/s")
