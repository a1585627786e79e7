"""FusedDiTBlock against the reference block (written from the DiT equations) evaluated in
float64, forward and every parameter/input gradient; state_dicts move between them."""

import copy

import pytest
import torch
from conftest import assert_close_rel

from onestep_kernels import use_backend
from onestep_kernels.layers import DiTBlock, FusedDiTBlock

SHAPES = [(2, 17, 96, 4), (3, 64, 384, 6), (1, 5, 200, 8)]  # (B, N, hidden, heads)


def randomised(block: torch.nn.Module, generator) -> torch.nn.Module:
    """Non-zero weights everywhere (adaLN-Zero starts as the identity, which tests nothing)."""
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return block


@pytest.mark.parametrize("fuse_linears", [False, True], ids=["fused_ops", "fused_linears"])
@pytest.mark.parametrize("B,N,D,H", SHAPES)
def test_fused_block_matches_float64_reference(B, N, D, H, fuse_linears, generator):
    """Training: with fuse_linears the gradients run through the separate ops."""
    fused = randomised(FusedDiTBlock(D, H, fuse_linears=fuse_linears), generator)
    reference = DiTBlock(D, H).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, N, D, generator=generator)
    c = torch.randn(B, D, generator=generator)
    dy = torch.randn(B, N, D, generator=generator)

    x1, c1 = x.clone().requires_grad_(), c.clone().requires_grad_()
    out = fused(x1, c1)
    out.backward(dy)
    x2, c2 = x.double().requires_grad_(), c.double().requires_grad_()
    ref = reference(x2, c2)
    ref.backward(dy.double())

    assert_close_rel(out, ref, torch.float32, "out")
    assert_close_rel(x1.grad, x2.grad, torch.float32, "dx")
    assert_close_rel(c1.grad, c2.grad, torch.float32, "dc")
    ref_params = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert_close_rel(p.grad, ref_params[name].grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("B,N,D,H", SHAPES[:2])
def test_fused_linears_inference_matches_float64_reference(B, N, D, H, generator):
    """Inference with fuse_linears: the fused-linear Triton kernel (through the interpreter),
    on the same state_dict as the default block."""
    fused = randomised(FusedDiTBlock(D, H, fuse_linears=True), generator)
    reference = DiTBlock(D, H).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, N, D, generator=generator)
    c = torch.randn(B, D, generator=generator)
    with torch.no_grad(), use_backend("triton"):
        out = fused(x, c)
    assert_close_rel(out, reference(x.double(), c.double()), torch.float32, "out")


def test_state_dict_names_match_the_reference_dit_block():
    keys = set(FusedDiTBlock(64, 4).state_dict())
    assert keys == {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"}
    assert keys == set(DiTBlock(64, 4).state_dict())


def test_fused_block_under_torch_compile(generator):
    block = randomised(FusedDiTBlock(64, 4), generator)
    x, c = torch.randn(2, 9, 64, generator=generator), torch.randn(2, 64, generator=generator)
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
    assert_close_rel(compiled(x, c), block(x, c).double(), torch.float32, "compiled")


def test_bad_heads():
    with pytest.raises(ValueError, match="num_heads"):
        FusedDiTBlock(100, 3)
