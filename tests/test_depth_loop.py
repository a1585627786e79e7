"""onestep_kernels.depth_loop: K applications of one adaLN-Zero block on the fused ops, against
the same loop in plain float64 PyTorch (forward, the kept states, the head's input and every
gradient: tokens, modulations, the block's weights), on each kernel backend; its 2K + 1
LayerNorm passes; bad input by name."""

import pytest
import torch
from conftest import assert_close_rel, backend_device

import onestep_kernels as ok
from onestep_kernels import depth_loop as loop
from onestep_kernels.layers import GATED, LAYERNORM, DiTBlock, FusedDiTBlock


def _case(generator, B=2, N=7, D=48, heads=3, K=3):
    block = DiTBlock(D, heads)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    x = torch.randn(B, N, D, generator=generator)
    mods = torch.randn(K, B, 6 * D, generator=generator) * 0.3
    head = [torch.randn(B, D, generator=generator) * 0.3 for _ in range(2)]
    return block, x, mods, head


def _run(block, fused: bool, x, mods, head, keep):
    if fused:
        fused_block = FusedDiTBlock(block.hidden_size, block.attn.num_heads).to(x.device,
                                                                                x.dtype)
        fused_block.load_state_dict(block.state_dict())
        block = fused_block
        return block, loop.depth_loop(x, mods, block.attn, block.mlp.fc1, block.mlp.fc2,
                                      keep=keep, head=head)
    block = block.to(x.device, x.dtype)
    return block, loop.reference_depth_loop(x, mods, block.attn, block.mlp, keep=keep,
                                            head=head)


@pytest.mark.parametrize("with_head", [True, False], ids=["head", "no_head"])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.slow)])
def test_matches_the_float64_reference_loop(backend, with_head, generator):
    block, x, mods, head = _case(generator)
    keep = (0, 2)
    device = backend_device(backend, "gated_residual_layernorm_modulate")
    ours_in = [t.to(device, copy=True).requires_grad_() for t in (x, mods, *head)]
    ref_in = [t.double().requires_grad_() for t in (x, mods, *head)]
    with ok.use_backend(backend):
        fused_block, (out, head_in, states) = _run(
            block, True, ours_in[0], ours_in[1], ours_in[2:] if with_head else None, keep)
    ref_block, (ref_out, ref_head, ref_states) = _run(
        block.double(), False, ref_in[0], ref_in[1], ref_in[2:] if with_head else None, keep)
    results = [out, *states] + ([head_in] if with_head else [])
    expected = [ref_out, *ref_states] + ([ref_head] if with_head else [])
    grads = [torch.randn(r.shape, generator=generator, dtype=torch.float64) for r in expected]
    torch.autograd.backward(results, [g.to(device, torch.float32) for g in grads])
    torch.autograd.backward(expected, grads)
    for i, (o, r) in enumerate(zip(results, expected)):
        assert_close_rel(o, r, torch.float32, f"result {i}")
    for name, t, r in zip(("dx", "dmodulations", "dhead_shift", "dhead_scale"), ours_in,
                          ref_in):
        if r.grad is not None:
            assert_close_rel(t.grad, r.grad, torch.float32, name)
        else:
            assert t.grad is None, name
    for (name, p), q in zip(fused_block.named_parameters(), ref_block.parameters()):
        if name.startswith("adaLN_modulation"):  # (the modulations come in made)
            assert p.grad is None and q.grad is None, name
        else:
            assert_close_rel(p.grad, q.grad, torch.float32, f"d{name}")


def test_the_loop_makes_2k_plus_1_layernorm_passes(generator, monkeypatch):
    """One LayerNorm-modulate, then two gated ops per application (the last one with the
    head's modulation): 2K + 1 passes where K blocks and a head make 3K + 1."""
    block, x, mods, head = _case(generator, K=5)
    calls = {"layernorm_modulate": 0, "gated": 0}
    for name, op in (("layernorm_modulate", LAYERNORM), ("gated", GATED)):
        def counted(*args, apply=op.apply, name=name, **kwargs):
            calls[name] += 1
            return apply(*args, **kwargs)
        monkeypatch.setattr(op, "apply", counted)
    with torch.no_grad():
        _run(block, True, x, mods, head, ())
    assert calls == {"layernorm_modulate": 1, "gated": 2 * 5}


def test_the_modulations_gradient_is_gathered_once_per_chunk_not_once_per_application(
        generator):
    """What reads the modulations' six chunks are six nodes (an unbind each), not one per
    application and chunk: a select per application would zero-fill and sum 6 K tensors of
    (K, B, D) in the backward."""
    block, x, mods, head = _case(generator, K=5)
    mods.requires_grad_()
    _, (out, head_in, _) = _run(block, True, x, mods, head, ())
    seen, stack, readers = set(), [head_in.grad_fn, out.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_node, _ in node.next_functions:
            readers.setdefault(next_node, []).append(type(node).__name__)
            stack.append(next_node)
    chunks = [n for n in seen if any(type(m).__name__ == "AccumulateGrad"
                                     and m.variable is mods for m, _ in n.next_functions)]
    assert len(chunks) == 1, "the modulations are read once (their chunk)"
    assert readers[chunks[0]] == ["UnbindBackward0"] * 6


@pytest.mark.parametrize("bad,match", [
    (dict(mods=torch.randn(0, 2, 6 * 48)), "modulations: expected shape"),
    (dict(mods=torch.randn(3, 2, 6 * 47)), "modulations: expected shape"),
    (dict(keep=(3,)), r"keep: expected applications in 0\.\.2"),
    (dict(head=[torch.randn(2, 47), torch.randn(2, 48)]), "head: expected"),
    (dict(x=torch.randn(2, 48)), "x: expected a 3-D tensor"),
])
def test_bad_input_names_the_argument(bad, match, generator):
    block, x, mods, head = _case(generator)
    args = dict(x=x, mods=mods, head=head, keep=())
    args.update(bad)
    for fused in (True, False):
        with pytest.raises(ValueError, match=match):
            _run(block, fused, args["x"], args["mods"], args["head"], args["keep"])
