"""The Single-Layer Transformer's depth loop, fp32 on the CPU: onestep's SLT forward against the
same model written as a plain eager PyTorch loop over the reference block's modules (each
application's modulation from its own product, the gates scaled by the step), torch.compile
of that loop, and the loop's floor, its matrix products and attention alone, timed in the same
run; and the K-step loop against K times one application of the same block timed alone.

Shapes: width 384 (slt-S), K = 28, 64 tokens (16 x 16 latents, patch 2), 16 candidates for the
forward and 4 for forward + backward; and the digits size (slt-tiny: width 48, K = 8, 16
tokens). Rates are GFLOP/s of the loop's matrix products and attention.

    pytest benchmarks/test_slt.py
"""

import pytest
import torch
import torch.nn.functional as F

from onestep_kernels.depth_loop import depth_loop
from onestep_kernels.layers import DiTBlock
from onestep_models.slt import SingleLayerTransformer

# name -> (width, heads, K, latent side, channels, candidates forward, candidates training)
SIZES = {"slt-S": (384, 6, 28, 16, 4, 16, 4), "slt-tiny": (48, 4, 8, 8, 1, 64, 64)}


def loop_flops(D: int, K: int, B: int, N: int) -> int:
    """Matrix-product and attention FLOPs of the K applications."""
    per = 2 * B * N * D * (3 * D + D + 4 * D + 4 * D) + 2 * 2 * B * N * N * D
    return K * per


def _models(name: str):
    D, H, K, side, C, _, _ = SIZES[name]
    torch.manual_seed(0)
    fused = SingleLayerTransformer(input_size=side, in_channels=C, hidden_size=D, num_heads=H,
                                   depth_steps=K, fusion_states=1, num_classes=10, fused=True)
    with torch.no_grad():
        for p in fused.parameters():  # adaLN-Zero's zeros would make the block the identity
            if p.requires_grad:
                p.normal_(0, 0.02)
    block = DiTBlock(D, H)
    block.load_state_dict(fused.block.state_dict())
    return fused, block


def _eager_loop(model, block):
    """The SLT as a plain eager loop over the reference block's modules: each application's
    modulation from its own product, its gates scaled by the step."""
    def modulated(h, shift, scale):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def forward(x, t, y):
        c = model.conditioning(t * model.time_scale, y)
        tau = model.tau_embedder(model.depth_time * model.time_scale)
        h = model.x_embedder(x) + model.pos_embed
        for k in range(model.depth_steps):
            sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c + tau[k]).chunk(6, dim=1)
            step = model.steps[k]
            h = h + (step * g1)[:, None] * block.attn(modulated(h, sh1, sc1))
            h = h + (step * g2)[:, None] * block.mlp(modulated(h, sh2, sc2))
        return model.unpatchify(model.final_layer(h, c))
    return forward


def _floor(model, B: int, N: int):
    """The loop's matrix products and attention alone, K times."""
    D, H = model.block.hidden_size, model.block.attn.num_heads
    a, m = model.block.attn, model.block.mlp
    h, u = torch.randn(B, N, D), torch.randn(B, N, m.fc1.out_features)
    q = torch.randn(B, H, N, D // H)

    def run():
        for _ in range(model.depth_steps):
            F.linear(h, a.qkv.weight, a.qkv.bias)
            F.scaled_dot_product_attention(q, q, q)
            F.linear(h, a.proj.weight, a.proj.bias)
            F.linear(h, m.fc1.weight, m.fc1.bias)
            F.linear(u, m.fc2.weight, m.fc2.bias)
    return run


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("contender", ["eager loop", "torch.compile(eager loop)", "onestep",
                                       "floor"])
def test_slt_forward(benchmark, record, contender, name, mode):
    D, H, K, side, C, b_inference, b_training = SIZES[name]
    B = b_inference if mode == "inference" else b_training
    N = (side // 2) ** 2
    model, block = _models(name)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(B, C, side, side, generator=g), torch.ones(B)
    y = torch.randint(0, 10, (B,), generator=g)
    if contender == "floor":
        if mode == "training":
            pytest.skip("the floor is the forward's (a training floor would be 3x it)")
        call = _floor(model, B, N)
    else:
        eager = _eager_loop(model, block)
        with torch.no_grad():
            expected = eager(x, t, y)[:, :C]
        forward = {"eager loop": eager, "torch.compile(eager loop)": torch.compile(eager),
                   "onestep": model}[contender]
        if mode == "inference":
            def call():
                with torch.no_grad():
                    return forward(x, t, y)
        else:
            params = [p for p in list(model.parameters()) + list(block.parameters())
                      if p.requires_grad]

            def call():
                for p in params:
                    p.grad = None
                out = forward(x, t, y)
                out.square().mean().backward()
                return out.detach()
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
