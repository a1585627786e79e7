"""bias_gelu_tanh: every backend against float64 GELU(tanh), forward and both gradients, at
awkward widths; poisoned launches; extreme values; registration; bad input."""

import re

import pytest
import torch
from conftest import (
    assert_close_rel,
    backend_device,
    backend_matrix,
    poisoned_backward,
    poisoned_forward,
    reference_rows,
    refused,
)
from test_layernorm_modulate import BATCH_TOKENS, DIMS

import onestep_kernels as ok
from onestep_kernels.block_nodes import linear_bias_gelu
from onestep_kernels.ops import bias_gelu_tanh as op


@pytest.mark.parametrize("B,N", BATCH_TOKENS)
@pytest.mark.parametrize("F", DIMS)
@pytest.mark.parametrize("backend,dtype,isa", backend_matrix("bias_gelu_tanh"))
def test_matches_float64_reference(backend, dtype, isa, F, B, N, generator, cpu_isa):
    cpu_isa(isa)
    B, N = reference_rows("bias_gelu_tanh", backend, B, N)
    dev = backend_device(backend, "bias_gelu_tanh")
    x = (torch.randn(B, N, F, generator=generator, dtype=torch.float64) * 3).to(dtype)
    bias = torch.randn(F, generator=generator, dtype=torch.float64).to(dtype)
    dy = torch.randn(B, N, F, generator=generator).to(dtype)
    ref_in = [t.double().requires_grad_() for t in (x, bias)]
    ref = op.reference(*ref_in)
    ref.backward(dy.double())
    test_in = [t.to(dev).requires_grad_() for t in (x, bias)]
    if reason := refused("bias_gelu_tanh", backend, dev, dtype, F):
        with pytest.raises(ValueError, match=re.escape(reason)):
            ok.bias_gelu_tanh(*test_in, backend=backend)
        return
    out = ok.bias_gelu_tanh(*test_in, backend=backend)
    out.backward(dy.to(dev))
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_rel(out.cpu(), ref, dtype, "out")
    assert_close_rel(test_in[0].grad.cpu(), ref_in[0].grad, dtype, "dx")
    assert_close_rel(test_in[1].grad.cpu(), ref_in[1].grad, dtype, "dbias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_launchers_write_every_element(backend, dtype, generator):
    R, F = 70, 300
    dev = backend_device(backend, "bias_gelu_tanh")
    x = torch.randn(R, F, generator=generator).to(dev, dtype)
    bias = torch.randn(F, generator=generator).to(dev, dtype)
    (y,) = poisoned_forward("bias_gelu_tanh", backend, (x, bias))
    assert torch.isfinite(y).all()
    dx, dbias = poisoned_backward("bias_gelu_tanh", backend, (torch.randn_like(x),), (x, bias), ())
    assert torch.isfinite(dx).all() and torch.isfinite(dbias).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_extreme_values(backend):
    """Large |u| saturates to u or 0 with gradient 1 or 0 (no inf/NaN from finite input);
    NaN stays NaN."""
    x = torch.tensor([[-1e30, -1e6, -60.0, -8.0, 0.0, 8.0, 60.0, 1e6, 1e30, float("nan")]])
    bias = torch.zeros(x.shape[1])
    dev = backend_device(backend, "bias_gelu_tanh")
    xg = x.to(dev, copy=True).requires_grad_()
    out = ok.bias_gelu_tanh(xg, bias.to(dev), backend=backend)
    out.sum().backward()
    out, x_grad = out.detach().cpu(), xg.grad.cpu()  # (xg.cpu() on a GPU would drop .grad)
    finite = ~torch.isnan(x)
    assert torch.isnan(out[~finite]).all() and torch.isnan(x_grad[~finite]).all()
    ref = op.reference(x.double(), bias.double()).float()
    # atol: at u = -8 the float64 reference itself is 0 (1 + tanh(z) cancels); ours is ~1e-21
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-6, atol=1e-12)
    grad = x_grad[finite]
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[[0, 1, 2, 6, 7, 8]], torch.tensor([0.0, 0, 0, 1, 1, 1]))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dbias_is_deterministic(backend, generator):
    x, bias, dy = (t.to(backend_device(backend, "bias_gelu_tanh")) for t in (
        torch.randn(300, 130, generator=generator), torch.randn(130, generator=generator),
        torch.randn(300, 130, generator=generator)))
    x, bias = x.requires_grad_(), bias.requires_grad_()
    grads = []
    for _ in range(2):
        bias.grad = None
        ok.bias_gelu_tanh(x, bias, backend=backend).backward(dy)
        grads.append(bias.grad.clone())
    assert torch.equal(*grads)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend, generator):
    dev = backend_device(backend, "bias_gelu_tanh")
    x = torch.randn(6, 40, generator=generator).to(dev).requires_grad_()
    bias = torch.randn(40, generator=generator).to(dev).requires_grad_()
    torch.library.opcheck(torch.ops.onestep.bias_gelu_tanh_fwd.default, (x, bias, backend))
    torch.library.opcheck(torch.ops.onestep.bias_gelu_tanh_bwd.default,
                          (torch.randn(6, 40, generator=generator).to(dev), x.detach(),
                           bias.detach(), backend))


@pytest.mark.slow
def test_torch_compile_fullgraph(generator):
    x = torch.randn(2, 9, 48, generator=generator, requires_grad=True)
    bias = torch.randn(48, generator=generator, requires_grad=True)
    loss = torch.compile(lambda x, b: ok.bias_gelu_tanh(x, b).square().sum(), fullgraph=True)(x, bias)
    loss.backward()
    ref_in = [t.detach().double().requires_grad_() for t in (x, bias)]
    op.reference(*ref_in).square().sum().backward()
    assert_close_rel(x.grad, ref_in[0].grad, torch.float32, "dx")
    assert_close_rel(bias.grad, ref_in[1].grad, torch.float32, "dbias")


# ---- linear_bias_gelu: fc1's product, bias and GELU as one autograd node ----------------------


def _linear_reference(x, weight, bias):
    return op.reference(torch.nn.functional.linear(x, weight), bias)


@pytest.mark.parametrize("needs", ["all", "frozen weight", "x only", "weight only"])
@pytest.mark.parametrize("shape", [(2, 7, 24), (5, 24)])
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_linear_bias_gelu_matches_float64_reference(backend, shape, needs, generator):
    """Forward and every gradient asked for, against float64; gradients not asked for stay
    None (ctx.needs_input_grad), on each backend (the reference backend takes the composed
    path)."""
    dev = backend_device(backend, "bias_gelu_tanh")
    F = 37
    x = torch.randn(shape, generator=generator) * 2
    weight = torch.randn(F, shape[-1], generator=generator) * shape[-1] ** -0.5
    bias = torch.randn(F, generator=generator)
    wants = {"all": (True, True, True), "frozen weight": (True, False, True),
             "x only": (True, False, False), "weight only": (False, True, False)}[needs]
    test_in = [t.to(dev, copy=True).requires_grad_(w) for t, w in zip((x, weight, bias), wants)]
    ref_in = [t.double().requires_grad_(w) for t, w in zip((x, weight, bias), wants)]
    dy = torch.randn(*shape[:-1], F, generator=generator)
    with ok.use_backend(backend):
        out = linear_bias_gelu(*test_in)
    out.backward(dy.to(dev))
    ref = _linear_reference(*ref_in)
    ref.backward(dy.double())
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_close_rel(out, ref, torch.float32, "out")
    for name, t, r in zip(("dx", "dweight", "dbias"), test_in, ref_in):
        if r.requires_grad:
            assert_close_rel(t.grad, r.grad, torch.float32, name)
        else:
            assert t.grad is None, name


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_linear_bias_gelu_without_gradients_overwrites_only_its_own_product(backend, generator,
                                                                            monkeypatch):
    """Inference: the GELU is written over the product it computed (the kernels' one buffer),
    never over an argument; values against float64, on each backend (the reference backend
    allocates as before)."""
    dev = backend_device(backend, "bias_gelu_tanh")
    x, weight, bias = (torch.randn(s, generator=generator).to(dev)
                       for s in ((3, 5, 24), (37, 24), (37,)))
    before = [t.clone() for t in (x, weight, bias)]
    products = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda *a: products.append(linear(*a)) or products[-1])
    with ok.use_backend(backend), torch.no_grad():
        out = linear_bias_gelu(x, weight, bias)
    assert_close_rel(out, _linear_reference(*(t.double() for t in before)), torch.float32, "out")
    for name, t, b in zip(("x", "weight", "bias"), (x, weight, bias), before):
        assert torch.equal(t, b), f"{name} was written"
    in_place = out.data_ptr() == products[0].data_ptr()
    assert in_place == (backend != "reference")


def test_linear_bias_gelu_records_one_node_and_agrees_with_the_composed_path(generator):
    """With gradients the eager call is one autograd node whose results equal the product
    then the op (the path torch.compile traces), to rounding."""
    x, weight, bias = (torch.randn(s, generator=generator, requires_grad=True)
                       for s in ((3, 5, 16), (40, 16), (40,)))
    out = linear_bias_gelu(x, weight, bias)
    assert type(out.grad_fn).__name__ == "_LinearBiasGeluBackward"
    assert {type(f).__name__ for f, _ in out.grad_fn.next_functions} == {"AccumulateGrad"}
    composed = op.bias_gelu_tanh(torch.nn.functional.linear(x, weight), bias)
    dy = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, (x, weight, bias), dy)
    ref_grads = torch.autograd.grad(composed, (x, weight, bias), dy)
    assert torch.equal(out, composed)
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)


def test_linear_bias_gelu_follows_autocast_like_the_linear(generator):
    """Under CPU autocast the product is bf16 as F.linear's would be; gradients come back in
    the inputs' dtypes, close to those of Linear then F.gelu under the same autocast."""
    x, weight, bias = (torch.randn(s, generator=generator) for s in ((2, 6, 32), (48, 32), (48,)))
    results = []
    for call in (linear_bias_gelu, lambda x, w, b: torch.nn.functional.gelu(
            torch.nn.functional.linear(x, w, b), approximate="tanh")):
        ins = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(*ins)
        out.float().square().sum().backward()
        results.append((out, [t.grad for t in ins]))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close_rel(out, ref.double(), torch.bfloat16, "out")
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32, name
        assert_close_rel(g, r.double(), torch.bfloat16, name)


def test_empty_rows():
    x = torch.randn(0, 5, 16, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    out = ok.bias_gelu_tanh(x, bias)
    out.sum().backward()
    assert out.shape == (0, 5, 16) and torch.equal(bias.grad, torch.zeros(16))


@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(3, 16), torch.randn(15)), ValueError, "bias:"),
    ((torch.randn(3, 16), torch.randn(2, 8)), ValueError, "bias:"),
    ((torch.randn(3, 16).int(), torch.randn(16)), TypeError, "x:"),
    ((torch.randn(3, 16), torch.randn(16, device="meta")), ValueError, "bias:"),
    ((torch.randn(3, 0), torch.randn(0)), ValueError, "x:"),
    (([1.0], torch.randn(1)), TypeError, "x:"),
])
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        ok.bias_gelu_tanh(*args)
