"""gated_residual_layernorm_modulate: every backend against float64, forward and all five
input gradients (both outputs carry gradient), awkward shapes; poisoned launches; registration;
bad input."""

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
from test_layernorm_modulate import BATCH_TOKENS, DIMS, MODULATION

import onestep_kernels as ok
from onestep_kernels.ops import gated_residual_layernorm_modulate as op

NAMES = ("x", "y", "gate", "shift", "scale")


def make_inputs(B, N, D, modulation, generator):
    x = torch.randn(B, N, D, generator=generator, dtype=torch.float64) + 0.3
    y = torch.randn(B, N, D, generator=generator, dtype=torch.float64) * 2.0
    mod_shape = (B, D) if modulation == "per_sample" else (B, N, D)
    gate, shift, scale = (torch.randn(mod_shape, generator=generator, dtype=torch.float64)
                          for _ in range(3))
    return x, y, gate, shift, scale


@pytest.mark.parametrize("modulation", MODULATION)
@pytest.mark.parametrize("B,N", BATCH_TOKENS)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("backend,dtype,isa", backend_matrix("gated_residual_layernorm_modulate"))
def test_matches_float64_reference(backend, dtype, isa, D, B, N, modulation, generator, cpu_isa):
    cpu_isa(isa)
    B, N = reference_rows("gated_residual_layernorm_modulate", backend, B, N, D)
    dev = backend_device(backend, "gated_residual_layernorm_modulate")
    inputs = [t.to(dtype) for t in make_inputs(B, N, D, modulation, generator)]
    dres = torch.randn(B, N, D, generator=generator).to(dtype)
    dout = torch.randn(B, N, D, generator=generator).to(dtype)
    ref_in = [t.double().requires_grad_() for t in inputs]
    ref_res, ref_out = op.reference(*ref_in)
    torch.autograd.backward([ref_res, ref_out], [dres.double(), dout.double()])

    test_in = [t.to(dev).requires_grad_() for t in inputs]
    if reason := refused("gated_residual_layernorm_modulate", backend, dev, dtype, D):
        with pytest.raises(ValueError, match=re.escape(reason)):
            ok.gated_residual_layernorm_modulate(*test_in, backend=backend)
        return
    res, out = ok.gated_residual_layernorm_modulate(*test_in, backend=backend)
    torch.autograd.backward([res, out], [dres.to(dev), dout.to(dev)])
    assert_close_rel(res.cpu(), ref_res, dtype, "residual")
    assert_close_rel(out.cpu(), ref_out, dtype, "out")
    for name, t, r in zip(NAMES, test_in, ref_in):
        assert_close_rel(t.grad.cpu(), r.grad, dtype, f"d{name}")


@pytest.mark.parametrize("modulation", MODULATION)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_launchers_write_every_element(backend, dtype, modulation, generator):
    B, N, D = 2, 35, 120
    dev = backend_device(backend, "gated_residual_layernorm_modulate")
    x, y, gate, shift, scale = (t.to(dev, dtype)
                                for t in make_inputs(B, N, D, modulation, generator))
    res, out, stats = poisoned_forward("gated_residual_layernorm_modulate", backend,
                                       (x, y, gate, shift, scale, 1e-6))
    for t in (res, out, stats):
        assert torch.isfinite(t).all()
    dres, dout = torch.randn_like(x), torch.randn_like(x)
    grads = poisoned_backward("gated_residual_layernorm_modulate", backend, (dres, dout),
                              (x, y, gate, scale, stats), (1e-6,))
    for t in grads:  # dx, dy, then dgate/shift/scale stacked
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_modulation_and_determinism(backend, generator):
    B, N, D = 3, 70, 96
    dev = backend_device(backend, "gated_residual_layernorm_modulate")
    c = torch.randn(B, 6 * D, generator=generator).to(dev)
    gate, shift, scale = c.chunk(6, dim=1)[2:5]
    x, y = (torch.randn(B, N, D, generator=generator).to(dev) for _ in range(2))
    runs = []
    for _ in range(2):  # detach() keeps the views' strides
        ins = [t.detach().requires_grad_() for t in (x, y, gate, shift, scale)]
        res, out = ok.gated_residual_layernorm_modulate(*ins, backend=backend)
        (res.square().sum() + out.sum()).backward()
        runs.append([res.detach(), out.detach()] + [t.grad for t in ins])
    ref = op.reference(*(t.cpu().double() for t in (x, y, gate, shift, scale)))
    assert_close_rel(runs[0][1], ref[1], torch.float32, "out")
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("modulation", MODULATION)
def test_opcheck(backend, modulation, generator):
    dev = backend_device(backend, "gated_residual_layernorm_modulate")
    inputs = [t.to(dev, torch.float32).requires_grad_()
              for t in make_inputs(2, 5, 40, modulation, generator)]
    torch.library.opcheck(torch.ops.onestep.gated_residual_layernorm_modulate_fwd.default,
                          (*inputs, 1e-6, backend))
    with torch.no_grad():
        _, _, stats = torch.ops.onestep.gated_residual_layernorm_modulate_fwd(
            *inputs, 1e-6, backend)
    d = [torch.randn(2, 5, 40, generator=generator).to(dev) for _ in range(2)]
    torch.library.opcheck(torch.ops.onestep.gated_residual_layernorm_modulate_bwd.default,
                          (*d, inputs[0].detach(), inputs[1].detach(), inputs[2].detach(),
                           inputs[4].detach(), stats, 1e-6, backend))


@pytest.mark.slow
def test_torch_compile_fullgraph(generator):
    inputs = [t.float().requires_grad_() for t in make_inputs(2, 9, 64, "per_sample", generator)]

    def step(*ins):
        res, out = ok.gated_residual_layernorm_modulate(*ins)
        return (res * out).sum()

    loss = torch.compile(step, fullgraph=True)(*inputs)
    loss.backward()
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_res, ref_out = op.reference(*ref_in)
    (ref_res * ref_out).sum().backward()
    for name, t, r in zip(NAMES, inputs, ref_in):
        assert_close_rel(t.grad, r.grad, torch.float32, f"d{name}")


def test_empty_tokens():
    x = torch.randn(2, 0, 16, requires_grad=True)
    mods = [torch.randn(2, 16, requires_grad=True) for _ in range(3)]
    res, out = ok.gated_residual_layernorm_modulate(x, torch.randn(2, 0, 16), *mods)
    (res.sum() + out.sum()).backward()
    for m in mods:
        assert torch.equal(m.grad, torch.zeros(2, 16))


def good():
    return [torch.randn(2, 3, 16), torch.randn(2, 3, 16)] + [torch.randn(2, 16) for _ in range(3)]


@pytest.mark.parametrize("index,bad,exc,match", [
    (0, torch.randn(2, 16), ValueError, "x:"),
    (1, torch.randn(2, 4, 16), ValueError, "y:"),
    (2, torch.randn(2, 3, 16), ValueError, "shift:"),  # gate per-token, shift per-sample
    (2, torch.randn(2, 15), ValueError, "gate:"),
    (3, torch.randn(2, 16, device="meta"), ValueError, "shift:"),
    (4, torch.randint(0, 3, (2, 16)), TypeError, "scale:"),
    (1, torch.randint(0, 3, (2, 3, 16)), TypeError, "y:"),
    (1, torch.randn(2, 3), ValueError, "y:"),
    (2, torch.randn(16), ValueError, "gate:"),
    (2, torch.randn(2, 1, 3, 16), ValueError, "gate:"),
    (3, [0.0] * 16, TypeError, "shift:"),
    (4, torch.randn(2, 32)[:, ::2], ValueError, "scale:"),
    (5, -1.0, ValueError, "eps:"),
    (5, "1e-6", TypeError, "eps:"),
])
def test_bad_input_names_the_argument(index, bad, exc, match):
    args = good() + [1e-6]  # x, y, gate, shift, scale, eps
    args[index] = bad
    with pytest.raises(exc, match=match):
        ok.gated_residual_layernorm_modulate(*args)


def test_x_and_y_of_any_layout_are_made_contiguous(generator):
    x, y, gate, shift, scale = good()
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # last dimension strided
    assert x_t.stride(-1) != 1 and torch.equal(x_t, x)
    res, out = ok.gated_residual_layernorm_modulate(x_t, y[:, :, :], gate, shift, scale)
    ref = op.reference(*(t.double() for t in (x, y, gate, shift, scale)))
    assert_close_rel(res, ref[0], torch.float32, "res")
    assert_close_rel(out, ref[1], torch.float32, "out")
