"""onestep_kernels.torch_compat: every private PyTorch entry point onestep uses, with its public
fallback. On the torch installed here the private path must be present (else the hot path is
silently slower) and both paths must give the same results; the fallbacks are exercised by
hiding the private pieces."""

import importlib

import pytest
import torch
from torch import nn

import onestep_kernels as ok
from onestep_kernels import torch_compat


def test_this_torch_has_every_private_entry_point():
    """A torch release that drops one is found here first (the fallback keeps onestep working,
    and this names what to update)."""
    missing = [name for name, found in torch_compat.PRIVATE.items()
               if not found and not (name == "torch._C._cuda_getDevice"
                                     and not torch.cuda.is_available())]
    assert not missing, f"this torch ({torch.__version__}) lacks {missing}"


@pytest.fixture
def public_only(monkeypatch):
    """torch_compat reloaded as on a torch without any of the private pieces."""
    hidden = {torch._C: ("_cuda_getDevice", "_is_any_autocast_enabled", "_FunctionBase"),
              torch: ("_addmm_activation",)}  # (torch's own Function.apply needs the rest)
    for owner, names in hidden.items():
        for name in names:
            monkeypatch.delattr(owner, name, raising=False)
    compat = importlib.reload(torch_compat)
    yield compat
    monkeypatch.undo()
    importlib.reload(torch_compat)


def test_the_public_fallbacks_compute_the_same(public_only, generator):
    compat = public_only
    assert not any(compat.PRIVATE[name] for name in (
        "torch._C._is_any_autocast_enabled", "torch._C._FunctionBase.apply",
        "torch._addmm_activation"))
    assert compat.any_autocast() is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compat.any_autocast() is True

    environ = {}  # a mapping without os.environ's raw dict
    mapping, key, decode = compat.environment_lookup("ONESTEP_TEST_VARIABLE", environ)
    assert decode(mapping.get(key)) is None
    environ["ONESTEP_TEST_VARIABLE"] = "cpu"
    assert decode(mapping.get(key)) == "cpu"

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    apply = compat.function_apply(Double, tensors=1)
    assert apply == Double.apply  # the public path
    x = torch.randn(3, generator=generator, requires_grad=True)
    apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))

    w, b = torch.randn(5, 4, generator=generator), torch.randn(5, generator=generator)
    h = torch.randn(3, 4, generator=generator)
    expected = torch.nn.functional.gelu(h @ w.t() + b, approximate="tanh")
    torch.testing.assert_close(compat.linear_gelu_tanh(h, w, b), expected)


def test_the_private_paths_compute_what_the_public_ones_do(generator):
    """With this torch's private pieces: a Linear with a hook is not bare, its parameters are
    its own, and an op's eager path (the C++ apply) gives the public apply's result."""
    linear = nn.Linear(4, 5)
    assert torch_compat.bare_linear(linear)
    assert torch_compat.linear_parameters(linear) == (linear.weight, linear.bias)
    handle = linear.register_forward_hook(lambda module, args, out: out)
    assert not torch_compat.bare_linear(linear)
    handle.remove()
    block = nn.Sequential(linear)
    assert torch_compat.child(block, "0") is linear
    from onestep_kernels.dispatch import OPS

    op = OPS["layernorm_modulate"]
    x, shift, scale = (torch.randn(s, generator=generator, requires_grad=True)
                       for s in ((2, 3, 8), (2, 8), (2, 8)))
    backend = op.resolve(None, x.device, x.dtype, 8, True)
    fast = op._apply_with_grad(x, shift, scale, 1e-6, backend)
    public = op._function.apply(x, shift, scale, 1e-6, backend)
    assert torch.equal(fast, public) and torch.equal(fast, ok.layernorm_modulate(x, shift, scale))
