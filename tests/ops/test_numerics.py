"""LayerNorm statistics at any width and offset: every backend's error stays within twice
PyTorch's own fp32 error (against float64) at D = 2^20 and with inputs offset by 1000 (Triton
at D = 2^14, its chunked loop under the interpreter kept to seconds), forward and backward;
and in fp16 and bf16 at row means 0, 64 and 1000, within twice the op's own fp32-inside
reference."""

import pytest
import torch
from conftest import backend_device, rel_error

import onestep_kernels as ok
from onestep_kernels.dispatch import OPS
from onestep_kernels.ops import gated_residual_layernorm_modulate as gated_op
from onestep_kernels.ops import layernorm_modulate as layernorm_op

# (name, D, offset): a very wide row, and a wide row far from zero.
CASES = [("wide", 2**20, 0.0), ("offset", 65536, 1000.0)]
WIDEST = 16384  # Triton's (any width; 128 chunks of a row under the interpreter)
BACKENDS = [("cpu", "avx2"), ("cpu", "base"), ("reference", None),
            pytest.param("triton", None, marks=pytest.mark.slow)]


def inputs(D, offset, generator, rows=2):
    x = torch.randn(1, rows, D, generator=generator, dtype=torch.float64) + offset
    shift = torch.randn(1, D, generator=generator, dtype=torch.float64)
    scale = torch.randn(1, D, generator=generator, dtype=torch.float64) * 0.5
    return x, shift, scale


def check(ours, torch_own, exact, what):
    """Our fp32 error at most twice PyTorch's fp32 error, plus float32's own rounding."""
    err, own = rel_error(ours, exact), rel_error(torch_own, exact)
    assert err <= 2 * own + 1e-6, f"{what}: error {err:.3g} vs PyTorch's {own:.3g}"


@pytest.mark.parametrize("case,D,offset", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_layernorm_modulate_statistics(backend, isa, case, D, offset, generator, cpu_isa):
    cpu_isa(isa)
    if backend == "triton":
        D = WIDEST
    x64, shift64, scale64 = inputs(D, offset, generator)
    dy64 = torch.randn(x64.shape, generator=generator, dtype=torch.float64)
    ins32 = [t.float() for t in (x64, shift64, scale64)]
    exact_in = [t.double().requires_grad_() for t in ins32]  # the values the kernels see
    exact = layernorm_op.reference(*exact_in)
    exact.backward(dy64.float().double())
    own_in = [t.clone().requires_grad_() for t in ins32]
    own = layernorm_op.reference(*own_in)  # PyTorch in fp32
    own.backward(dy64.float())
    dev = backend_device(backend, "layernorm_modulate")
    ours_in = [t.to(dev).requires_grad_() for t in ins32]
    ours = ok.layernorm_modulate(*ours_in, backend=backend)
    ours.backward(dy64.float().to(dev))
    check(ours, own, exact, "out")
    check(ours_in[0].grad, own_in[0].grad, exact_in[0].grad, "dx")
    check(ours_in[2].grad, own_in[2].grad, exact_in[2].grad, "dscale")


@pytest.mark.parametrize("case,D,offset", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_gated_residual_statistics(backend, isa, case, D, offset, generator, cpu_isa):
    cpu_isa(isa)
    if backend == "triton":
        D = WIDEST
    x64, shift64, scale64 = inputs(D, offset, generator)
    y64 = torch.randn(x64.shape, generator=generator, dtype=torch.float64)
    gate64 = torch.randn(shift64.shape, generator=generator, dtype=torch.float64)
    ins32 = [t.float() for t in (x64, y64, gate64, shift64, scale64)]
    exact_in = [t.double().requires_grad_() for t in ins32]
    own_in = [t.clone().requires_grad_() for t in ins32]
    ours_in = [t.to(backend_device(backend, "gated_residual_layernorm_modulate")).requires_grad_()
               for t in ins32]
    results = [gated_op.reference(*exact_in), gated_op.reference(*own_in),
               ok.gated_residual_layernorm_modulate(*ours_in, backend=backend)]
    for res, out in results:
        (res.sum() + (out * out.detach()).sum()).backward()
    (_, exact), (_, own), (_, ours) = results
    check(ours, own, exact, "out")
    check(ours_in[0].grad, own_in[0].grad, exact_in[0].grad, "dx")


# ---- half precision far from zero: the backward differentiates what the forward computed ----
#
# Rows of mean 0, 64 and 1000 in fp16 and bf16, forward and every gradient, against float64 on
# the same (rounded) inputs. The bar is the op's own reference, which computes in fp32 and
# rounds once: a backend may be at most twice as far from float64. (A baseline computed in
# half precision throughout would be as wrong as the defect this guards against: the gated
# op's backward once rebuilt x_hat from the residual rounded to the output dtype while its
# statistics described the fp32 one; in bf16 at mean 64 its dscale was 58x further off.)

HALF_MEANS = (0.0, 64.0, 1000.0)
HALF_BACKENDS = ("cpu-avx2", "cpu-base", "triton", "cuda")
D_HALF = 1152


def _half_backend(op: str, name: str, dtype: torch.dtype, cpu_isa) -> tuple[str, torch.device]:
    """(backend, device) for a half-precision case, skipping with the reason where this
    machine cannot run it."""
    backend, _, isa = name.partition("-")
    cpu_isa(isa or None)
    device = backend_device(backend, op)
    reason = OPS[op].reason(backend, device, dtype, D_HALF, True)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    return backend, device


def _half_inputs(shapes, mean, dtype, generator):
    """Fresh random inputs rounded to `dtype`, the first shifted by `mean`."""
    return [(torch.randn(shape, generator=generator, dtype=torch.float64)
             + (mean if i == 0 else 0.0)).to(dtype) for i, shape in enumerate(shapes)]


def _results(fn, inputs, grads):
    """fn's outputs, then every input's gradient for the output gradients `grads`."""
    inputs = [t.clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [t.grad for t in inputs]


# op -> (its reference, its tensors' shapes for rows (B, N) and modulation `mod`, the names of
# its outputs then of its inputs' gradients); x first (shifted by the row mean)
HALF_OPS = {
    "layernorm_modulate": (layernorm_op.reference, lambda rows, mod: [rows, mod, mod],
                           ("out", "dx", "dshift", "dscale")),
    "gated_residual_layernorm_modulate": (
        gated_op.reference, lambda rows, mod: [rows, rows, mod, mod, mod],
        ("res", "out", "dx", "dy", "dgate", "dshift", "dscale")),
}


@pytest.mark.parametrize("mean", HALF_MEANS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", HALF_BACKENDS)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("op", list(HALF_OPS))
def test_half_precision_far_from_zero(op, name, dtype, mean, per_token, generator, cpu_isa):
    """Every output and gradient at most twice as far from float64 as the op's own reference
    (fp32 inside, rounded once) is."""
    reference, shapes, names = HALF_OPS[op]
    backend, device = _half_backend(op, name, dtype, cpu_isa)
    rows = (2, 33, D_HALF)
    inputs = _half_inputs(shapes(rows, rows if per_token else (2, D_HALF)), mean, dtype,
                          generator)
    returns = OPS[op].spec.returns
    grads = _half_inputs([rows] * returns, 0.0, dtype, generator)
    exact = _results(reference, [t.double() for t in inputs], [g.double() for g in grads])
    own = _results(reference, inputs, grads)
    ours = _results(lambda *a: OPS[op].public(*a, backend=backend),
                    [t.to(device) for t in inputs], [g.to(device) for g in grads])
    for what, e, o, u in zip(names, exact, own, ours):
        err, bar = rel_error(u, e), rel_error(o, e)
        assert err <= 2 * bar + 1e-6, f"{what}: error {err:.3g}, the reference's {bar:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_partial_sums_are_added_in_fp32_and_rounded_once(dtype):
    """The Triton backwards add their programs' fp32 partial sums into the gradient: in fp32,
    rounded once. torch.sum(..., out=) of a lower precision rounds each partial first, which
    a cancellation exposes (1000.1 - 1000.0 gives 0 in bfloat16)."""
    from onestep_kernels.ops.common import add_up_partials

    partials = torch.tensor([[1000.1, 3.0], [-1000.0, -2.0]])
    for in_graph in (False, True):
        out = torch.empty(2, dtype=dtype)
        add_up_partials(partials, 0, out, in_graph=in_graph)
        assert torch.equal(out, partials.sum(0).to(dtype)), (out, in_graph)
