"""block_nodes.gated_mlp_input, the gated residual + modulated LayerNorm + fc1 + GELU as one
autograd node: against float64 on each kernel backend, the gradients asked for and no others,
one node that agrees with the two it replaces, autocast, and where it steps aside."""

import pytest
import torch
from conftest import assert_close_rel, backend_device

import onestep_kernels as ok
from onestep_kernels import block_nodes
from onestep_kernels.layers import FusedDiTBlock
from onestep_kernels.ops import bias_gelu_tanh as gelu_op
from onestep_kernels.ops import gated_residual_layernorm_modulate as gated_op

EPS = 1e-5
NAMES = ("dx", "dy", "dgate", "dshift", "dscale", "dweight", "dbias")


def _inputs(generator, B=2, N=7, D=24, F=37, per_token=False):
    modulation = (B, N, D) if per_token else (B, D)
    return [torch.randn(s, generator=generator) * k for s, k in (
        ((B, N, D), 1.0), ((B, N, D), 1.0), (modulation, 0.5), (modulation, 0.5),
        (modulation, 0.5), ((F, D), D ** -0.5), ((F,), 1.0))]


def _reference(x, y, gate, shift, scale, weight, bias):
    """The two steps composed from their float64 references."""
    res, h = gated_op.reference(x, y, gate, shift, scale, EPS)
    return res, gelu_op.reference(torch.nn.functional.linear(h, weight), bias)


def _run(backend, tensors):
    """gated_mlp_input on `backend`, both ops resolved as dit_block_forward resolves them."""
    x = tensors[0]
    with ok.use_backend(backend):
        gated = gated_op.OP.resolve(None, x.device, x.dtype, x.shape[-1], True)
        return block_nodes.gated_mlp_input(*tensors, EPS, gated)


@pytest.mark.parametrize("needs", ["all", "frozen fc1", "x only"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_matches_float64_reference(backend, per_token, needs, generator):
    """Both outputs and every gradient asked for against float64; the others stay None."""
    dev = backend_device(backend, "gated_residual_layernorm_modulate")
    inputs = _inputs(generator, per_token=per_token)
    wants = {"all": [True] * 7, "frozen fc1": [True] * 5 + [False] * 2,
             "x only": [True] + [False] * 6}[needs]
    test_in = [t.to(dev, copy=True).requires_grad_(w) for t, w in zip(inputs, wants)]
    ref_in = [t.double().requires_grad_(w) for t, w in zip(inputs, wants)]
    res, hidden = _run(backend, test_in)
    ref_res, ref_hidden = _reference(*ref_in)
    dres, dhidden = (torch.randn(t.shape, generator=generator) for t in (res, hidden))
    torch.autograd.backward((res, hidden), (dres.to(dev), dhidden.to(dev)))
    torch.autograd.backward((ref_res, ref_hidden), (dres.double(), dhidden.double()))
    assert_close_rel(res, ref_res, torch.float32, "residual")
    assert_close_rel(hidden, ref_hidden, torch.float32, "hidden")
    for name, t, r in zip(NAMES, test_in, ref_in):
        if r.requires_grad:
            assert_close_rel(t.grad, r.grad, torch.float32, name)
        else:
            assert t.grad is None, name


def test_is_one_node_that_agrees_with_the_two_it_replaces(generator):
    """One autograd node over the leaves, whose outputs equal the gated op then linear_bias_gelu
    (two nodes) bitwise and whose gradients equal theirs to rounding."""
    inputs = [t.requires_grad_() for t in _inputs(generator)]
    res, hidden = _run("cpu", inputs)
    assert type(res.grad_fn).__name__ == "_GatedMlpInputBackward" and hidden.grad_fn is res.grad_fn
    assert {type(f).__name__ for f, _ in res.grad_fn.next_functions} == {"AccumulateGrad"}
    x, y, gate, shift, scale, weight, bias = inputs
    ref_res, h = ok.gated_residual_layernorm_modulate(x, y, gate, shift, scale, EPS,
                                                      backend="cpu")
    ref_hidden = block_nodes.linear_bias_gelu(h, weight, bias)
    assert torch.equal(res, ref_res) and torch.equal(hidden, ref_hidden)
    grads_out = [torch.randn(t.shape, generator=generator) for t in (res, hidden)]
    grads = torch.autograd.grad((res, hidden), inputs, grads_out)
    ref_grads = torch.autograd.grad((ref_res, ref_hidden), inputs, grads_out)
    for name, g, r in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)


def test_follows_autocast_like_the_two_nodes(generator):
    """Under bf16 autocast (CUDA with Triton where there is a GPU, else the CPU kernels) fc1's
    product runs in bf16 as F.linear's would, the LayerNorm in fp32; outputs and gradients
    (in the inputs' dtypes) as the two separate nodes give."""
    backend = "triton" if torch.cuda.is_available() else "cpu"
    dev = backend_device(backend, "gated_residual_layernorm_modulate")
    inputs = [t.to(dev) for t in _inputs(generator)]
    results = []
    for fused in (True, False):
        ins = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            if fused:
                res, hidden = _run(backend, ins)
            else:
                res, h = ok.gated_residual_layernorm_modulate(*ins[:5], EPS, backend=backend)
                with ok.use_backend(backend):
                    hidden = block_nodes.linear_bias_gelu(h, *ins[5:])
        (res.square().sum() + hidden.float().square().sum()).backward()
        results.append(((res, hidden), [t.grad for t in ins]))
    ((res, hidden), grads), ((ref_res, ref_hidden), ref_grads) = results
    assert res.dtype == torch.float32 and hidden.dtype == ref_hidden.dtype == torch.bfloat16
    assert torch.equal(res, ref_res) and torch.equal(hidden, ref_hidden)
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32, name
        assert_close_rel(g, r.double(), torch.bfloat16, name)


def test_steps_aside_where_autograd_or_tracing_should_run_the_ops(generator):
    """None without gradients and on a PyTorch-expression backend (autograd differentiates
    those): the caller runs the two ops."""
    inputs = [t.requires_grad_() for t in _inputs(generator)]
    assert _run("reference", inputs) is None
    with torch.no_grad():
        assert _run("cpu", inputs) is None


def test_the_fused_block_records_it_when_training(generator):
    block = FusedDiTBlock(32, 2)
    x = torch.randn(2, 5, 32, generator=generator, requires_grad=True)
    out = block(x, torch.randn(2, 32, generator=generator))
    names = {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
    assert "_GatedMlpInputBackward" in names, names
