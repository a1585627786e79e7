"""FusedDiTBlock against the reference block (written from the DiT equations) evaluated in
float64, forward and every parameter/input gradient; state_dicts move between them."""

import copy

import pytest
import torch
from conftest import assert_close_rel, backend_device

from onestep_kernels import use_backend
from onestep_kernels.layers import DiTBlock, FusedDiTBlock

SHAPES = [(2, 17, 96, 4), (3, 64, 384, 6), (1, 5, 200, 8)]  # (B, N, hidden, heads)
DEVICE = backend_device("triton", "layernorm_modulate")  # the GPU when there is one


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
    fused.to(DEVICE)
    x = torch.randn(B, N, D, generator=generator)
    c = torch.randn(B, D, generator=generator)
    dy = torch.randn(B, N, D, generator=generator)

    x1, c1 = (t.to(DEVICE, copy=True).requires_grad_() for t in (x, c))
    out = fused(x1, c1)
    out.backward(dy.to(DEVICE))
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
    fused.to(DEVICE)
    x = torch.randn(B, N, D, generator=generator)
    c = torch.randn(B, D, generator=generator)
    with torch.no_grad(), use_backend("triton"):
        out = fused(x.to(DEVICE), c.to(DEVICE))
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


def test_hooks_and_adapters_on_the_linears_apply(generator):
    """A forward hook on each Linear (as LoRA adapters and casting wrappers use) changes the
    fused block's output exactly as it changes the reference block's."""
    B, N, D, H = 2, 9, 64, 4
    fused = randomised(FusedDiTBlock(D, H), generator)
    reference = DiTBlock(D, H).double()
    reference.load_state_dict(fused.state_dict())

    def adapter(module, inputs, output):
        return output + 0.1 * inputs[0].sum(-1, keepdim=True)

    for block in (fused, reference):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            block.get_submodule(name).register_forward_hook(adapter)
    x = torch.randn(B, N, D, generator=generator)
    c = torch.randn(B, D, generator=generator)
    with torch.no_grad():
        out, ref = fused(x, c), reference(x.double(), c.double())
        unhooked = DiTBlock(D, H).double()
        unhooked.load_state_dict(fused.state_dict())
        assert rel(unhooked(x.double(), c.double()), ref) > 1e-2  # the hooks matter
    assert_close_rel(out, ref, torch.float32, "hooked out")


class LowRankAdapter(torch.nn.Module):
    """A wrapper that replaces a Linear in its parent, as peft's LoRA layers do."""

    def __init__(self, base: torch.nn.Linear, generator):
        super().__init__()
        self.base = base
        self.down = torch.randn(4, base.in_features, generator=generator) * 0.1
        self.up = torch.randn(base.out_features, 4, generator=generator) * 0.1

    def forward(self, x):
        return self.base(x) + x @ self.down.to(x.dtype).T @ self.up.to(x.dtype).T


def test_submodules_replaced_after_construction_are_the_ones_called(generator):
    """The fused block reads its submodules at every call (never a cached reference), so an
    adapter swapped in after the first call (LoRA on fc1 and the adaLN projection) takes
    effect, with gradients."""
    B, N, D, H = 2, 5, 64, 4
    fused = randomised(FusedDiTBlock(D, H), generator)
    reference = DiTBlock(D, H).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, N, D, generator=generator)
    c = torch.randn(B, D, generator=generator)
    fused(x, c)  # a first call before the swap
    plain = copy.deepcopy(reference)
    for block in (fused, reference):
        g = torch.Generator().manual_seed(1)
        block.mlp.fc1 = LowRankAdapter(block.mlp.fc1, g)
        block.adaLN_modulation[1] = LowRankAdapter(block.adaLN_modulation[1], g)
    xg = x.clone().requires_grad_()
    out = fused(xg, c)
    ref = reference(xg.detach().double().requires_grad_(), c.double())
    assert rel(plain(x.double(), c.double()), ref) > 1e-2  # the adapters matter
    assert_close_rel(out, ref, torch.float32, "adapted out")
    out.sum().backward()
    assert xg.grad is not None and fused.mlp.fc1.base.weight.grad is not None


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_the_block_validates_its_input_once(generator, monkeypatch):
    """FusedDiTBlock.forward checks x and the modulation at its entry; the ops inside run
    their inner layers and validate nothing again."""
    from onestep_kernels import checks

    block = randomised(FusedDiTBlock(64, 4), generator)
    x, c = torch.randn(2, 9, 64, generator=generator), torch.randn(2, 64, generator=generator)
    seen = []
    original = checks.tensor
    monkeypatch.setattr(checks, "tensor", lambda name, *a: seen.append(name) or original(name, *a))
    for grad in (False, True):
        seen.clear()
        with torch.set_grad_enabled(grad):
            block(x, c)
        assert seen == ["x", "modulation"], seen


def test_dit_block_forward_rejects_bad_input_by_name(generator):
    from onestep_kernels.layers import dit_block_forward

    block = FusedDiTBlock(64, 4)
    args = (block.attn, block.mlp.fc1, block.mlp.fc2)
    with pytest.raises(ValueError, match="modulation:"):
        dit_block_forward(torch.randn(2, 9, 64), torch.randn(2, 6 * 63), *args)
    with pytest.raises(ValueError, match="x:"):
        dit_block_forward(torch.randn(9, 64), torch.randn(2, 6 * 64), *args)
    with pytest.raises(TypeError, match="x:"):
        dit_block_forward("tokens", torch.randn(2, 6 * 64), *args)
    with pytest.raises(ValueError, match="mlp_norm_eps:"):
        dit_block_forward(torch.randn(2, 9, 64), torch.randn(2, 6 * 64), *args, mlp_norm_eps=0.0)


def test_dit_block_forward_takes_an_fc1_without_bias(generator):
    from onestep_kernels.layers import dit_block_forward

    block = randomised(FusedDiTBlock(64, 4), generator)
    fc1 = torch.nn.Linear(64, 256, bias=False)
    x, m = torch.randn(2, 9, 64, generator=generator), torch.randn(2, 6 * 64, generator=generator)
    out = dit_block_forward(x, m, block.attn, fc1, block.mlp.fc2)
    reference = DiTBlock(64, 4).double()
    reference.load_state_dict(block.state_dict())
    reference.mlp.fc1 = torch.nn.Linear(64, 256, bias=False).double()
    with torch.no_grad():
        reference.mlp.fc1.weight.copy_(fc1.weight)
        reference.adaLN_modulation = torch.nn.Identity()
        ref = reference(x.double(), m.double())
    assert_close_rel(out, ref, torch.float32, "out")


@pytest.mark.parametrize("B,N,D,H", [(2, 17, 72, 2), (3, 64, 144, 2)])
def test_bf16_inference_is_as_accurate_as_the_reference_block(B, N, D, H, generator):
    """Inference in bf16, the dtype DiTs sample in (on CUDA fc1's bias and GELU then run in
    cuBLASLt's epilogue): the fused block's error against float64 is at most twice the
    reference block's own in bf16 (flash-attention's rule)."""
    fused = randomised(FusedDiTBlock(D, H), generator)
    exact = DiTBlock(D, H).double()
    exact.load_state_dict(fused.state_dict())
    reference = DiTBlock(D, H)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, N, D, generator=generator)
    c = torch.randn(B, D, generator=generator)
    want = exact(x.double(), c.double())
    xb, cb = x.to(DEVICE, torch.bfloat16), c.to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        ours = fused.to(DEVICE, torch.bfloat16)(xb, cb).double().cpu()
        theirs = reference.to(DEVICE, torch.bfloat16)(xb, cb).double().cpu()
    error = ((ours - want).norm() / want.norm()).item()
    bound = ((theirs - want).norm() / want.norm()).item()
    assert error <= 2 * bound + 1e-4, (error, bound)


def test_attention_gradient_reaches_the_projection_in_one_copy(generator):
    """The fused attention's q, k, v are the reference's views of the QKV projection, taken so
    that autograd writes their gradients into the projection's layout with one stack: no
    second copy of 3 B N D elements (split_heads' backward makes one, as timm's does)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from onestep_kernels.layers import Attention, split_heads, split_heads_packed_grad

    qkv = torch.randn(2, 7, 3 * 24, generator=generator)
    for a, b in zip(split_heads(qkv, 4), split_heads_packed_grad(qkv, 4)):
        assert (a.shape, a.stride(), a.data_ptr()) == (b.shape, b.stride(), b.data_ptr())

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.stack, torch.ops.aten.cat,
                                       torch.ops.aten.clone, torch.ops.aten.copy_):
                seen.append((func.overloadpacket.__name__, tuple(out.shape)))
            return out

    x = torch.randn(2, 7, 24, generator=generator, requires_grad=True)
    for fused, copies in ((False, 2), (True, 1)):
        attention = Attention(24, 4, fused=fused)
        with use_backend("sdpa"):
            out = attention(x)
        seen = []
        with Copies():
            out.backward(torch.ones_like(out))
        assert len(seen) == copies, seen
    assert seen == [("stack", (2, 7, 3, 4, 6))]


@pytest.mark.slow
def test_compiled_block_trains_across_batch_sizes(generator):
    """torch.compile recompiles with dynamic shapes when the batch size changes (the second
    size): the ops' fake implementations must follow symbolic shapes, forward and backward."""
    block = randomised(FusedDiTBlock(64, 4), generator)
    compiled = torch.compile(copy.deepcopy(block))
    for B, N in ((2, 9), (3, 7)):
        x = torch.randn(B, N, 64, generator=generator, requires_grad=True)
        c = torch.randn(B, 64, generator=generator, requires_grad=True)
        compiled(x, c).square().sum().backward()
        got = (x.grad, c.grad)
        x.grad = c.grad = None
        reference = block.double()(x.double(), c.double())
        reference.square().sum().backward()
        block.float()
        for name, g, want in (("x", got[0], x.grad), ("c", got[1], c.grad)):
            assert_close_rel(g, want, torch.float32, f"B={B} d{name}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("D", [2432, 3072])
def test_dit_block_tail_at_the_widths_of_sd35_large_and_flux(D, backend, generator):
    """The stream end that SD3's and Flux's fused blocks run (gated residual + modulated
    LayerNorm, fc1's bias + GELU, the MLP's gated residual), at SD3.5-Large's and Flux's
    widths, against float64, forward and every gradient, on the CPU kernels and on Triton's
    (which take any width since their rows are cut in chunks; the interpreter without a GPU)."""
    import torch.nn.functional as F

    from onestep_kernels.layers import dit_block_tail

    B, N = 2, 3
    device = backend_device(backend, "gated_residual_layernorm_modulate")
    fc1, fc2 = torch.nn.Linear(D, 4 * D), torch.nn.Linear(4 * D, D)
    with torch.no_grad():
        for p in (*fc1.parameters(), *fc2.parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    tensors = [torch.randn(B, N, D, generator=generator), torch.randn(B, N, D, generator=generator)]
    tensors += [torch.randn(B, D, generator=generator) * 0.5 for _ in range(4)]
    inputs = [t.to(device, copy=True).requires_grad_() for t in tensors]
    fc1_dev, fc2_dev = copy.deepcopy(fc1).to(device), copy.deepcopy(fc2).to(device)
    with use_backend(backend):
        out = dit_block_tail(*inputs, fc1_dev, fc2_dev, mlp_norm_eps=1e-6)
    dout = torch.randn(out.shape, generator=generator)
    out.backward(dout.to(device))

    exact = [t.double().requires_grad_() for t in tensors]
    fc1_64, fc2_64 = copy.deepcopy(fc1).double(), copy.deepcopy(fc2).double()
    x, branch, gate, shift, scale, mlp_gate = exact
    r = x + gate[:, None] * branch
    h = F.layer_norm(r, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    ref = r + mlp_gate[:, None] * fc2_64(F.gelu(fc1_64(h), approximate="tanh"))
    ref.backward(dout.double())
    assert_close_rel(out, ref, torch.float32, f"output at D={D}")
    for name, mine, theirs in zip(("x", "branch", "gate", "shift", "scale", "mlp_gate"),
                                  inputs, exact):
        assert_close_rel(mine.grad, theirs.grad, torch.float32, f"d{name} at D={D}")
    for name, mine, theirs in (("fc1.weight", fc1_dev.weight, fc1_64.weight),
                               ("fc2.weight", fc2_dev.weight, fc2_64.weight)):
        assert_close_rel(mine.grad, theirs.grad, torch.float32, f"d{name} at D={D}")
