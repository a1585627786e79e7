"""layernorm_modulate at DiT widths (B=32, N=256 tokens, D in {384, 768, 1152}), fp32 on the CPU:
eager PyTorch, torch.compile and onestep's cpu kernel in one run, each as GB/s (x, shift and
scale read once, the output written once), beside two ceilings measured in the same run: a
large copy into an existing buffer (the memory bandwidth) and a copy into a fresh tensor of the
op's output size (what any op that allocates its output pays under the allocator condition).
"onestep cpu (out=)" writes into a reused buffer, so it shows the kernel without allocation.

    pytest benchmarks/test_layernorm_modulate.py [--allocator tuned]
"""

import pytest
import torch

import onestep_kernels as ok

B, N = 32, 256
DIMS = [384, 768, 1152]
COPY_BYTES = 256 * 2**20  # per buffer; far larger than the caches


def eager(x, shift, scale):
    """What a DiT implementation writes (the reference DiT's `modulate(norm(x), shift, scale)`)."""
    normed = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


_compiled = torch.compile(eager, dynamic=False)


def inputs(D):
    g = torch.Generator().manual_seed(D)
    return (torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g),
            torch.randn(B, D, generator=g))


def traffic_bytes(D) -> int:
    return 4 * (2 * B * N * D + 2 * B * D)


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("contender", ["eager", "torch.compile", "onestep cpu",
                                       "onestep cpu (out=)"])
def test_layernorm_modulate(benchmark, record, contender, D):
    x, shift, scale = inputs(D)
    if contender == "eager":
        fn = eager
    elif contender == "torch.compile":
        fn = _compiled
        fn(x, shift, scale)  # compile outside the timing
    elif contender == "onestep cpu":
        fn = lambda x, shift, scale: ok.layernorm_modulate(x, shift, scale, backend="cpu")  # noqa: E731
    else:
        buffer = torch.empty_like(x)
        fn = lambda x, shift, scale: ok.layernorm_modulate(x, shift, scale, backend="cpu",  # noqa: E731
                                                           out=buffer)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, shift, scale), eager(x, shift, scale), rtol=1e-4, atol=1e-4)
        benchmark.group = f"layernorm_modulate D={D}"
        benchmark(fn, x, shift, scale)
    record(f"layernorm_modulate B={B} N={N} D={D} fp32", contender, traffic_bytes(D), "GB/s")


def test_copy_ceiling(benchmark, record):
    """The bandwidth ceiling: a large copy into an existing buffer, bytes read + written."""
    src = torch.randn(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    benchmark.group = "ceiling"
    benchmark(dst.copy_, src)
    record("ceiling", "copy (read + write)", 2 * COPY_BYTES, "GB/s")


def test_fresh_copy_ceiling(benchmark, record):
    """A copy into a fresh (B, N, 1152) tensor: the allocation cost every allocating op pays."""
    src = torch.randn(B, N, 1152)
    benchmark.group = "ceiling"
    benchmark(torch.clone, src)
    record("ceiling", "copy into fresh (32,256,1152)", 2 * src.numel() * 4, "GB/s")
