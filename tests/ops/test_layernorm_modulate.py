"""layernorm_modulate: every backend against a float64 reference, forward and all gradients,
at awkward shapes; launchers write every output element; registration; bad input."""

import os
import re

import pytest
import torch
from conftest import (
    GPU,
    assert_close_rel,
    backend_device,
    backend_matrix,
    poisoned_backward,
    poisoned_forward,
    reference_rows,
    refused,
)

import onestep_kernels as ok
from onestep_kernels.ops import layernorm_modulate_op as op
from onestep_kernels.ops import padded_rows

DIMS = [64, 384, 1000, 1152, 4096]
BATCH_TOKENS = [(1, 1), (3, 257), (257, 3)]
MODULATION = ["per_sample", "per_token"]

def make_inputs(B, N, D, modulation, generator):
    """float64 masters: x with a non-zero mean and spread, modulation of both signs."""
    x = torch.randn(B, N, D, generator=generator, dtype=torch.float64) * 2.0 + 0.5
    mod_shape = (B, D) if modulation == "per_sample" else (B, N, D)
    shift = torch.randn(mod_shape, generator=generator, dtype=torch.float64)
    scale = torch.randn(mod_shape, generator=generator, dtype=torch.float64) * 0.5
    return x, shift, scale


@pytest.mark.parametrize("modulation", MODULATION)
@pytest.mark.parametrize("B,N", BATCH_TOKENS)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("backend,dtype,isa", backend_matrix("layernorm_modulate"))
def test_matches_float64_reference(backend, dtype, isa, D, B, N, modulation, generator, cpu_isa):
    cpu_isa(isa)
    B, N = reference_rows("layernorm_modulate", backend, B, N, D)
    dev = backend_device(backend, "layernorm_modulate")
    x64, shift64, scale64 = make_inputs(B, N, D, modulation, generator)
    dy64 = torch.randn(B, N, D, generator=generator, dtype=torch.float64)
    # The reference sees exactly the values the kernel sees (rounded to dtype).
    inputs = [t.to(dtype) for t in (x64, shift64, scale64)]
    ref_in = [t.double().requires_grad_() for t in inputs]
    ref = op.reference(*ref_in)
    ref.backward(dy64.to(dtype).double())

    test_in = [t.to(dev).requires_grad_() for t in inputs]
    if reason := refused("layernorm_modulate", backend, dev, dtype, D):
        with pytest.raises(ValueError, match=re.escape(reason)):
            ok.layernorm_modulate(*test_in, backend=backend)
        return
    out = ok.layernorm_modulate(*test_in, backend=backend)
    assert out.dtype == dtype and out.device.type == dev.type
    out.backward(dy64.to(dtype).to(dev))
    assert_close_rel(out.cpu(), ref, dtype, "out")
    for name, t, r in zip(("dx", "dshift", "dscale"), test_in, ref_in):
        assert_close_rel(t.grad.cpu(), r.grad, dtype, name)


@pytest.mark.parametrize("modulation", MODULATION)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_launchers_write_every_element(backend, dtype, modulation, generator):
    """Outputs are poisoned with NaN before the launch; every element must be overwritten."""
    B, N, D = 3, 37, 200
    dev = backend_device(backend, "layernorm_modulate")
    x64, shift64, scale64 = make_inputs(B, N, D, modulation, generator)
    x, shift, scale = (t.to(dev, dtype) for t in (x64, shift64, scale64))
    dy = torch.randn(B, N, D, generator=generator).to(dev, dtype)
    out, stats = poisoned_forward("layernorm_modulate", backend, (x, shift, scale, 1e-6))
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    grads = poisoned_backward("layernorm_modulate", backend, (dy,), (x, scale, stats), (1e-6,))
    for t in grads:  # dx, and dshift and dscale stacked
        assert torch.isfinite(t).all()


def test_strided_views_are_read_in_place(generator):
    """DiT passes chunks of the adaLN output: (B, D) views with row stride 6D. And x may be a
    slice along N. Both are read through their strides and give the reference result."""
    B, N, D = 4, 33, 96
    c_host = torch.randn(B, 6 * D, generator=generator)
    x_host = torch.randn(B, 2 * N, D, generator=generator)
    for backend in ("cpu", "triton"):
        dev = backend_device(backend, "layernorm_modulate")
        shift, scale = c_host.to(dev).chunk(6, dim=1)[:2]
        assert not shift.is_contiguous()
        x = x_host.to(dev)[:, ::2]
        assert not x.is_contiguous()
        out = ok.layernorm_modulate(x, shift, scale, backend=backend)
        ref = op.reference(*(t.cpu().double() for t in (x, shift, scale)))
        assert_close_rel(out, ref, torch.float32, f"{backend} out")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backward_is_deterministic(backend, generator):
    B, N, D = 2, 300, 257
    dev = backend_device(backend, "layernorm_modulate")
    x, shift, scale = (t.to(dev, torch.float32).requires_grad_()
                       for t in make_inputs(B, N, D, "per_sample", generator))
    dy = torch.randn(B, N, D, generator=generator).to(dev)
    grads = []
    for _ in range(2):
        for t in (x, shift, scale):
            t.grad = None
        ok.layernorm_modulate(x, shift, scale, backend=backend).backward(dy)
        grads.append([t.grad.clone() for t in (x, shift, scale)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_large_fp32_output_is_streamed_and_correct(threads, generator):
    """A fp32 output of 16 MB or more takes the CPU kernel's streaming stores (each thread
    fences after its share; one thread runs without an OpenMP region): every element equals
    the float64 reference within fp32's tolerance, on one thread and on two."""
    B, N, D = 2, 2048, 1024  # 16 MB of fp32 output
    x64, shift64, scale64 = make_inputs(B, N, D, "per_sample", generator)
    inputs = [t.float() for t in (x64, shift64, scale64)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ok.layernorm_modulate(*inputs, backend="cpu")
    finally:
        torch.set_num_threads(before)
    ref = op.reference(*(t.double() for t in inputs))
    assert_close_rel(out, ref, torch.float32, "out")
    assert (out.double() - ref).abs().max() < 1e-4  # everywhere: no row left unwritten


def test_nan_row_stays_in_its_row(generator):
    """Documented: a row holding NaN gives NaN in that output row (and its gradients),
    other rows are unaffected."""
    x, shift, scale = (t.float() for t in make_inputs(2, 5, 64, "per_sample", generator))
    x[1, 3, 7] = float("nan")
    for backend in ("cpu", "triton", "reference"):
        dev = backend_device(backend, "layernorm_modulate")
        out = ok.layernorm_modulate(x.to(dev), shift.to(dev), scale.to(dev),
                                    backend=backend).cpu()
        assert torch.isnan(out[1, 3]).all()
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1, 3] = False
        assert torch.isfinite(out[mask]).all()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_empty_batch_or_tokens(backend):
    dev = backend_device(backend, "layernorm_modulate")
    for B, N in ((0, 4), (3, 0)):
        x = torch.randn(B, N, 32, device=dev, requires_grad=True)
        shift = torch.randn(B, 32, device=dev, requires_grad=True)
        scale = torch.randn(B, 32, device=dev, requires_grad=True)
        out = ok.layernorm_modulate(x, shift, scale, backend=backend)
        assert out.shape == (B, N, 32)
        out.sum().backward()
        assert torch.equal(shift.grad, torch.zeros(B, 32, device=dev))
        assert torch.equal(scale.grad, torch.zeros(B, 32, device=dev))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("modulation", MODULATION)
def test_opcheck(backend, modulation, generator):
    dev = backend_device(backend, "layernorm_modulate")
    x, shift, scale = (t.to(dev, torch.float32) for t in make_inputs(2, 7, 48, modulation, generator))
    for t in (x, shift, scale):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.onestep.layernorm_modulate_fwd.default,
                          (x, shift, scale, 1e-6, backend))
    with torch.no_grad():
        _, stats = torch.ops.onestep.layernorm_modulate_fwd(x, shift, scale, 1e-6, backend)
    dy = torch.randn(2, 7, 48, generator=generator).to(dev)
    torch.library.opcheck(torch.ops.onestep.layernorm_modulate_bwd.default,
                          (dy, x.detach(), scale.detach(), stats, 1e-6, backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_torch_compile_fullgraph(backend, generator):
    x, shift, scale = (t.float().requires_grad_() for t in make_inputs(2, 9, 80, "per_sample", generator))

    def step(x, shift, scale):
        return (ok.layernorm_modulate(x, shift, scale, backend=backend) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, shift, scale)
    loss.backward()
    got = [t.grad.clone() for t in (x, shift, scale)]
    ref_in = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    ref_loss = (op.reference(*ref_in) ** 2).sum()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for g, r in zip(got, ref_in):
        assert_close_rel(g, r.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_out_buffer(backend, generator):
    dev = backend_device(backend, "layernorm_modulate")
    x, shift, scale = (t.to(dev, torch.float32)
                       for t in make_inputs(3, 11, 130, "per_token", generator))
    out = torch.full_like(x, float("nan"))
    result = ok.layernorm_modulate(x, shift, scale, backend=backend, out=out)
    assert result is out
    assert_close_rel(out, op.reference(*(t.cpu().double() for t in (x, shift, scale))),
                     torch.float32, "out")
    native = backend if backend != "reference" else ("triton" if dev.type == "cuda" else "cpu")
    torch.library.opcheck(torch.ops.onestep.layernorm_modulate_out.default,
                          (x, shift, scale, 1e-6, native, torch.empty_like(x)))


def test_out_buffer_bad_input():
    x, shift, scale = good()
    with pytest.raises(ValueError, match="out:"):
        ok.layernorm_modulate(x, shift, scale, out=torch.empty(2, 3, 15))
    with pytest.raises(TypeError, match="out:"):
        ok.layernorm_modulate(x, shift, scale, out=torch.empty(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="out:"):
        ok.layernorm_modulate(x.requires_grad_(), shift, scale, out=torch.empty(2, 3, 16))
    with pytest.raises(ValueError, match="out:"):
        ok.layernorm_modulate(x.detach(), shift, scale, out=x.detach())
    with pytest.raises(TypeError, match="out: expected a torch.Tensor, got list"):
        ok.layernorm_modulate(x.detach(), shift, scale, out=[0.0])


# ---- bad input --------------------------------------------------------------------------------


def good(B=2, N=3, D=16):
    return torch.randn(B, N, D), torch.randn(B, D), torch.randn(B, D)


@pytest.mark.parametrize(
    "make,exc,names",
    [
        (lambda: (torch.randn(2, 16), *good()[1:]), ValueError, "x:"),
        (lambda: (good()[0], torch.randn(2, 17), torch.randn(2, 17)), ValueError, "shift:"),
        (lambda: (good()[0], torch.randn(3, 16), torch.randn(3, 16)), ValueError, "shift:"),
        (lambda: (*good()[:2], torch.randn(2, 3, 16)), ValueError, "scale:"),
        (lambda: (good()[0].int(), *good()[1:]), TypeError, "x:"),
        (lambda: (good()[0], good()[1], torch.randn(2, 16, device="meta")), ValueError, "scale:"),
        (lambda: (torch.randn(2, 16, 3).transpose(1, 2), *good()[1:]), ValueError, "x:"),
        (lambda: (torch.randn(2, 3, 0), torch.randn(2, 0), torch.randn(2, 0)), ValueError, "x:"),
        (lambda: ([[1.0]], *good()[1:]), TypeError, "x:"),
    ],
    ids=["x-2d", "shift-wrong-D", "shift-wrong-batch", "scale-shape-differs", "x-int",
         "scale-other-device", "x-last-dim-strided", "x-empty-D", "x-not-tensor"],
)
def test_bad_input_names_the_argument(make, exc, names):
    with pytest.raises(exc, match=names):
        ok.layernorm_modulate(*make())


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), "1e-6"])
def test_bad_eps(eps):
    with pytest.raises((ValueError, TypeError), match="eps:"):
        ok.layernorm_modulate(*good(), eps=eps)


def test_triton_rejects_what_it_cannot_run_and_default_falls_back():
    dev = backend_device("triton_padded", "layernorm_modulate")
    D = padded_rows.LAYERNORM_MAX_D + 1
    x, shift, scale = (torch.randn(*s, device=dev) for s in ((1, 2, D), (1, D), (1, D)))
    with pytest.raises(ValueError, match=r"takes D in 1\.\.4096 for float32, got D=4097"):
        ok.layernorm_modulate(x, shift, scale, backend="triton_padded")
    if not GPU:  # the interpreter's limitation
        with pytest.raises(ValueError, match="bfloat16"):
            ok.layernorm_modulate(*(t.bfloat16() for t in good()), backend="triton")
    assert torch.isfinite(ok.layernorm_modulate(x, shift, scale)).all()  # another backend


@pytest.mark.parametrize("modulation", MODULATION)
@pytest.mark.parametrize("D", [2432, 3072, 8192])
def test_triton_takes_the_widths_of_wide_models(D, modulation, generator):
    """The chunked kernels take any width: SD3.5-Large's 2432, Flux's 3072 and 8192 (the
    padded ones stopped at 4096), forward and every gradient, in float32 and float16."""
    dev = backend_device("triton", "layernorm_modulate")
    for dtype in (torch.float32, torch.float16):
        inputs = [t.to(dtype) for t in make_inputs(2, 3, D, modulation, generator)]
        dy = torch.randn(2, 3, D, generator=generator, dtype=torch.float64).to(dtype)
        ref_in = [t.double().requires_grad_() for t in inputs]
        op.reference(*ref_in).backward(dy.double())
        test_in = [t.to(dev).requires_grad_() for t in inputs]
        out = ok.layernorm_modulate(*test_in, backend="triton")
        out.backward(dy.to(dev))
        assert_close_rel(out.cpu(), op.reference(*ref_in).detach(), dtype, "out")
        for name, t, r in zip(("dx", "dshift", "dscale"), test_in, ref_in):
            assert_close_rel(t.grad.cpu(), r.grad, dtype, name)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ok.layernorm_modulate(*good(), backend="fastest")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_cuda_backend_on_cpu_tensors_is_refused():
    with pytest.raises(ValueError, match="cuda"):
        ok.layernorm_modulate(*good(), backend="cuda")
