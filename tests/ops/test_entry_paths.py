"""The two entry paths over one implementation agree bitwise: an eager call goes straight to
a backend's launchers (through an autograd.Function when gradients are needed), while
torch.compile and opcheck see the registered torch.library op. Both run the same launchers,
so outputs and gradients must be identical."""

import pytest
import torch
from conftest import to_backend

import onestep_kernels as ok

BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.slow)]


def both_paths(eager_call, op_call, inputs):
    """(outputs, gradients) of the eager path and of the registered op."""
    results = []
    for call in (eager_call, op_call):
        ins = [t.detach().clone().requires_grad_() for t in inputs]
        out = call(*ins)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) * 0.5 + o.detach() for o in outs])
        results.append(([o.detach() for o in outs], [t.grad for t in ins]))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_modulate(backend, generator):
    inputs = to_backend(backend, "layernorm_modulate", torch.randn(2, 5, 40, generator=generator),
                        torch.randn(2, 40, generator=generator),
                        torch.randn(2, 40, generator=generator))
    eager, op = both_paths(
        lambda x, sh, sc: ok.layernorm_modulate(x, sh, sc, backend=backend),
        lambda x, sh, sc: torch.ops.onestep.layernorm_modulate_fwd(x, sh, sc, 1e-6, backend)[0],
        inputs)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_residual_layernorm_modulate(backend, generator):
    inputs = to_backend(backend, "gated_residual_layernorm_modulate",
                        *(torch.randn(2, 5, 40, generator=generator) for _ in range(5)))
    eager, op = both_paths(
        lambda *a: ok.gated_residual_layernorm_modulate(*a, backend=backend),
        lambda *a: tuple(torch.ops.onestep.gated_residual_layernorm_modulate_fwd(
            *a, 1e-6, backend)[:2]),
        inputs)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(10, 48), (2, 5, 48)])  # the kernels take any rank as rows
def test_bias_gelu_tanh(backend, shape, generator):
    inputs = to_backend(backend, "bias_gelu_tanh", torch.randn(shape, generator=generator),
                        torch.randn(48, generator=generator))
    eager, op = both_paths(
        lambda x, b: ok.bias_gelu_tanh(x, b, backend=backend),
        lambda x, b: torch.ops.onestep.bias_gelu_tanh_fwd(x, b, backend),
        inputs)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(backend, generator):
    inputs = to_backend(backend, "attention",
                        *(torch.randn(1, 2, 9, 32, generator=generator) for _ in range(3)))
    eager, op = both_paths(
        lambda q, k, v: ok.attention(q, k, v, backend=backend),
        lambda q, k, v: torch.ops.onestep.attention_fwd(q, k, v, 32 ** -0.5, backend)[0],
        inputs)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)


# ---- function_apply: the eager paths' shortcut to the C++ autograd.Function apply ------------------


def _eager_op(generator):
    from onestep_kernels.ops import layernorm_modulate as op

    shift, scale = (torch.randn(2, 16, generator=generator) for _ in range(2))
    return op.OP, op.OP.resolve(None, shift.device, shift.dtype, 16, True), shift, scale


def test_function_apply_unwraps_tensors_that_escaped_a_functorch_transform(generator):
    """A tensor kept from inside torch.func.grad is a dead functorch wrapper afterwards; the
    C++ apply alone cannot read it (no storage), so function_apply unwraps it as
    Function.apply does, and both give the same result."""
    op, backend, shift, scale = _eager_op(generator)
    kept = []

    def loss(x):
        kept.append(x * 2)
        return kept[-1].sum()

    torch.func.grad(loss)(torch.randn(2, 3, 16, generator=generator))
    assert torch._C._functorch.is_functorch_wrapped_tensor(kept[0])
    shift.requires_grad_()
    out = op._apply_with_grad(kept[0], shift, scale, 1e-6, backend)
    expected = op._function.apply(kept[0], shift, scale, 1e-6, backend)
    assert torch.equal(out, expected)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(out)
    out.sum().backward()
    assert shift.grad is not None


def test_function_apply_under_a_functorch_transform_behaves_as_function_apply(generator):
    op, backend, shift, scale = _eager_op(generator)
    x = torch.randn(2, 3, 16, generator=generator)
    messages = []
    for apply in (op._apply_with_grad, op._function.apply):
        with pytest.raises(RuntimeError) as error:
            torch.func.grad(lambda s, apply=apply: apply(x, s, scale, 1e-6, backend).sum())(shift)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "setup_context" in messages[0]


def test_function_apply_refuses_functions_with_setup_context():
    from onestep_kernels.torch_compat import function_apply

    class WithSetupContext(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    with pytest.raises(TypeError, match="setup_context"):
        function_apply(WithSetupContext, tensors=1)


BAD_CALLS = {
    "layernorm_modulate": [
        lambda: ok.layernorm_modulate(torch.randn(2, 3, 8), torch.randn(2, 7), torch.randn(2, 7)),
        lambda: ok.layernorm_modulate(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8),
                                      eps=-1.0),
        lambda: ok.layernorm_modulate(torch.randn(2, 8, 3).transpose(1, 2), torch.randn(2, 3),
                                      torch.randn(2, 3)),
        lambda: ok.layernorm_modulate(torch.randn(2, 3, 8), torch.randn(2, 8),
                                      torch.randn(2, 8, device="meta"))],
    "gated_residual_layernorm_modulate": [
        lambda: ok.gated_residual_layernorm_modulate(
            torch.randn(2, 3, 8), torch.randn(2, 4, 8), *[torch.randn(2, 8)] * 3),
        lambda: ok.gated_residual_layernorm_modulate(
            torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8),
            torch.randn(2, 8), torch.randn(2, 8))],
    "bias_gelu_tanh": [lambda: ok.bias_gelu_tanh(torch.randn(3, 8), torch.randn(7)),
                       lambda: ok.bias_gelu_tanh(torch.randn(3, 8).int(), torch.randn(8)),
                       lambda: ok.bias_gelu_tanh(torch.randn(3, 8), torch.randn(8, device="meta"))],
    "attention": [lambda: ok.attention(*[torch.randn(1, 2, 3, 8)] * 2, torch.randn(1, 2, 4, 8)),
                  lambda: ok.attention(*[torch.randn(1, 2, 3, 8)] * 3, scale=0.0)],
    "score_candidates": [
        lambda: ok.score_candidates(torch.randn(6, 3, 8), 4, other=torch.randn(6, 3, 8)),
        lambda: ok.score_candidates(torch.randn(6, 3, 8), 3, weight=torch.randn(5, 8),
                                    target=torch.tensor([1, 2, 3])),
        lambda: ok.score_candidates(torch.randn(6, 3, 8), 3, weight=torch.randn(5, 8),
                                    target=torch.tensor([1, 2], device="meta"))],
}


@pytest.mark.parametrize("op", list(BAD_CALLS))
def test_bad_arguments_never_reach_a_kernel(op, monkeypatch):
    """Every public entry point refuses bad arguments before any backend's launcher runs:
    with every launcher replaced by a tripwire, each call raises the argument error."""
    import dataclasses

    from onestep_kernels.dispatch import OPS

    def tripwire(*args, **kwargs):
        raise AssertionError("a kernel was reached")

    records = OPS[op].backends
    for name, record in list(records.items()):
        if record.forward is not None:
            monkeypatch.setitem(records, name, dataclasses.replace(record, forward=tripwire))
    monkeypatch.setattr(OPS[op], "_cache", {})
    for call in BAD_CALLS[op]:
        with pytest.raises((ValueError, TypeError)) as error:
            call()
        assert ": " in str(error.value) and "kernel was reached" not in str(error.value)


# ---- the Triton backend as triton_ops (what inductor launches under torch.compile on a GPU) ----

NO_GPU_TRITON_OP = ("on the CPU a triton_op cannot pass opcheck or torch.compile under the "
                    "interpreter (fake tensors meet CPU storage); runs on a CUDA machine")


@pytest.mark.slow
def test_triton_ops_agree_with_the_eager_triton_path(generator):
    """Called eagerly (the interpreter here, the GPU there), the triton_ops give exactly what
    the eager Triton path gives, outputs and gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from onestep_kernels.ops import layernorm_modulate
        from onestep_kernels.triton_compat import wrap_triton

        try:  # (torch 2.11 takes only compiled kernels: Triton 3.6's interpreted ones are not)
            wrap_triton(layernorm_modulate._layernorm_modulate_fwd_kernel)
        except RuntimeError as error:
            pytest.skip(f"this torch's wrap_triton refuses the interpreter's kernels ({error})")
    ln = [torch.randn(2, 5, 40, generator=generator).to(device),
          torch.randn(2, 40, generator=generator).to(device),
          torch.randn(2, 40, generator=generator).to(device)]
    eager, op = both_paths(
        lambda x, sh, sc: ok.layernorm_modulate(x, sh, sc, backend="triton"),
        lambda x, sh, sc: torch.ops.onestep.layernorm_modulate_triton(x, sh, sc, 1e-6)[0], ln)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)
    gated = [torch.randn(2, 5, 40, generator=generator).to(device) for _ in range(2)] + \
        [torch.randn(2, 40, generator=generator).to(device) for _ in range(3)]
    eager, op = both_paths(
        lambda *a: ok.gated_residual_layernorm_modulate(*a, backend="triton"),
        lambda *a: tuple(torch.ops.onestep.gated_residual_layernorm_modulate_triton(
            *a, 1e-6)[:2]), gated)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU_TRITON_OP)
def test_triton_ops_opcheck_and_compile(generator):
    x, shift, scale = (torch.randn(s, generator=generator).cuda().requires_grad_()
                       for s in ((2, 7, 64), (2, 64), (2, 64)))
    torch.library.opcheck(torch.ops.onestep.layernorm_modulate_triton.default,
                          (x, shift, scale, 1e-6))
    y = torch.randn(2, 7, 64, generator=generator).cuda().requires_grad_()
    torch.library.opcheck(torch.ops.onestep.gated_residual_layernorm_modulate_triton.default,
                          (x, y, shift, shift, scale, 1e-6))
    compiled = torch.compile(lambda *a: ok.layernorm_modulate(*a, backend="triton").sum(),
                             fullgraph=True)
    loss = compiled(x, shift, scale)
    loss.backward()
    ref_in = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    from onestep_kernels.ops import layernorm_modulate as op
    op.reference(*ref_in).sum().backward()
    for t, r in zip((x, shift, scale), ref_in):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-4)
