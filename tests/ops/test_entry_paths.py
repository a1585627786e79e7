"""The two entry paths over one implementation agree bitwise: an eager call goes straight to
a backend's launchers (through an autograd.Function when gradients are needed), while
torch.compile and opcheck see the registered torch.library op. Both run the same launchers,
so outputs and gradients must be identical."""

import pytest
import torch

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
    inputs = [torch.randn(2, 5, 40, generator=generator), torch.randn(2, 40, generator=generator),
              torch.randn(2, 40, generator=generator)]
    eager, op = both_paths(
        lambda x, sh, sc: ok.layernorm_modulate(x, sh, sc, backend=backend),
        lambda x, sh, sc: torch.ops.onestep.layernorm_modulate_fwd(x, sh, sc, 1e-6, backend)[0],
        inputs)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_residual_layernorm_modulate(backend, generator):
    inputs = [torch.randn(2, 5, 40, generator=generator) for _ in range(2)] + \
        [torch.randn(2, 5, 40, generator=generator) for _ in range(3)]
    eager, op = both_paths(
        lambda *a: ok.gated_residual_layernorm_modulate(*a, backend=backend),
        lambda *a: tuple(torch.ops.onestep.gated_residual_layernorm_modulate_fwd(
            *a, 1e-6, backend)[:2]),
        inputs)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu_tanh(backend, generator):
    inputs = [torch.randn(10, 48, generator=generator), torch.randn(48, generator=generator)]
    eager, op = both_paths(
        lambda x, b: ok.bias_gelu_tanh(x, b, backend=backend),
        lambda x, b: torch.ops.onestep.bias_gelu_tanh_fwd(x, b, backend),
        inputs)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(backend, generator):
    inputs = [torch.randn(1, 2, 9, 32, generator=generator) for _ in range(3)]
    eager, op = both_paths(
        lambda q, k, v: ok.attention(q, k, v, backend=backend),
        lambda q, k, v: torch.ops.onestep.attention_fwd(q, k, v, 32 ** -0.5, backend)[0],
        inputs)
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, b)
