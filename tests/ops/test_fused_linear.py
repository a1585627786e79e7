"""fused_linear: the Triton kernel (through the interpreter, forward only) and the torch
backend (onestep's separate ops, forward and every gradient) against a float64 formula, for
each way a DiT block uses it, per-sample and per-token modulation, awkward sizes."""

import pytest
import torch
from conftest import assert_close_rel, backend_device

import onestep_kernels as ok
from onestep_kernels.ops import fused_linear as op

# name -> (modulated LayerNorm before, activation, gated residual after, bias)
VARIANTS = {
    "qkv": (True, None, False, True),
    "proj": (False, None, True, True),
    "fc1": (True, "gelu_tanh", False, True),
    "everything": (True, "gelu_tanh", True, True),
    "plain_no_bias": (False, None, False, False),
}
SHAPES = [(2, 37, 72, 100), (1, 5, 300, 33), (3, 1, 17, 130)]  # (B, N, K, M_out)
DEVICE = backend_device("triton", "fused_linear")  # the GPU when there is one


def make(variant, shape, per_token, dtype, generator):
    """Inputs rounded to dtype, as a dict of fused_linear's arguments."""
    norm, activation, gated, has_bias = VARIANTS[variant]
    B, N, K, M = shape

    def rand(*size, mul=1.0, add=0.0):
        out = torch.randn(size, generator=generator, dtype=torch.float64) * mul + add
        return out.to(DEVICE, dtype)

    args = {"x": rand(B, N, K, add=0.5), "weight": rand(M, K, mul=K ** -0.5),
            "bias": rand(M) if has_bias else None, "activation": activation}
    mod = (B, N) if per_token else (B,)
    if norm:
        args.update(shift=rand(*mod, K), scale=rand(*mod, K, mul=0.5))
    if gated:
        args.update(gate=rand(*mod, M), residual=rand(B, N, M))
    return args


def reference64(args):
    return op.reference(**{k: v.cpu().double() if isinstance(v, torch.Tensor) else v
                           for k, v in args.items()})


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_float64_reference(dtype, variant, shape, per_token, generator):
    args = make(variant, shape, per_token, dtype, generator)
    with torch.no_grad():
        out = ok.fused_linear(**args, backend="triton")
    assert out.dtype == dtype
    assert_close_rel(out, reference64(args), dtype, "out")


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_forward_and_gradients(dtype, variant, per_token, generator):
    """What training runs on every backend: onestep's separate ops, with autograd."""
    args = make(variant, SHAPES[0], per_token, dtype, generator)
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    test_in = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    ref_in = {k: v.cpu().double().requires_grad_() for k, v in tensors.items()}
    out = ok.fused_linear(**{**args, **test_in})  # a gradient is needed: never the kernel
    ref = op.reference(**{**args, **ref_in})
    dy = torch.randn(ref.shape, generator=generator).to(dtype)
    out.backward(dy.to(out.device))
    ref.backward(dy.double())
    assert_close_rel(out, ref, dtype, "out")
    for name in tensors:
        assert_close_rel(test_in[name].grad, ref_in[name].grad, dtype, f"d{name}")


def test_modulation_views_read_in_place(generator):
    """shift/scale/gate as c.chunk(...) views, as a DiT block makes them."""
    B, N, K = 2, 9, 40
    x = torch.randn(B, N, K, generator=generator).to(DEVICE)
    weight = torch.randn(K, K, generator=generator).to(DEVICE) / K ** 0.5
    shift, scale, gate = torch.randn(B, 3 * K, generator=generator).to(DEVICE).chunk(3, dim=1)
    residual = torch.randn(B, N, K, generator=generator).to(DEVICE)
    assert not shift.is_contiguous()
    args = dict(x=x, weight=weight, shift=shift, scale=scale, gate=gate, residual=residual)
    with torch.no_grad():
        out = ok.fused_linear(**args, backend="triton")
    assert_close_rel(out, reference64(args), torch.float32, "out")


def test_kernel_writes_every_element(generator, monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    args = make("everything", (2, 37, 72, 100), False, torch.float32, generator)
    with torch.no_grad():
        out = ok.fused_linear(**args, backend="triton")
    assert torch.isfinite(out).all()


def test_gradients_never_reach_the_forward_only_kernel(generator):
    args = make("qkv", SHAPES[0], False, torch.float32, generator)
    x = args.pop("x").requires_grad_()
    with pytest.raises(ValueError, match="forward only"):
        ok.fused_linear(x, **args, backend="triton")
    ok.fused_linear(x, **args).sum().backward()  # the default takes the separate ops
    assert x.grad is not None


def test_opcheck(generator):
    args = make("everything", (2, 5, 24, 20), True, torch.float32, generator)
    torch.library.opcheck(torch.ops.onestep.fused_linear_fwd.default,
                          (args["x"], args["weight"], args["bias"], args["shift"], args["scale"],
                           args["gate"], args["residual"], 1e-6, True, "triton"))


@pytest.mark.slow
def test_torch_compile_fullgraph(generator):
    args = make("fc1", (2, 5, 24, 20), False, torch.float32, generator)
    compiled = torch.compile(lambda a: ok.fused_linear(**a, backend="triton"), fullgraph=True)
    with torch.no_grad():
        assert_close_rel(compiled(args), reference64(args), torch.float32, "out")


def test_empty_tokens():
    x = torch.randn(2, 0, 8, device=DEVICE)
    with torch.no_grad():
        out = ok.fused_linear(x, torch.randn(4, 8, device=DEVICE), backend="triton")
    assert out.shape == (2, 0, 4)


@pytest.mark.parametrize("change,exc,match", [
    ({"x": torch.randn(2, 8)}, ValueError, "x:"),
    ({"weight": torch.randn(4, 9)}, ValueError, "weight:"),
    ({"bias": torch.randn(5)}, ValueError, "bias:"),
    ({"bias": torch.randn(4).int()}, TypeError, "bias:"),
    ({"shift": torch.randn(2, 8)}, ValueError, "shift:"),
    ({"shift": torch.randn(2, 7), "scale": torch.randn(2, 7)}, ValueError, "shift:"),
    ({"shift": torch.randn(2, 8), "scale": torch.randn(2, 3, 8)}, ValueError, "scale:"),
    ({"shift": torch.randn(2, 8), "scale": torch.randn(2, 8), "eps": 0.0}, ValueError, "eps:"),
    ({"activation": "relu"}, ValueError, "activation:"),
    ({"gate": torch.randn(2, 4)}, ValueError, "gate:"),
    ({"gate": torch.randn(2, 4), "residual": torch.randn(2, 3, 5)}, ValueError, "residual:"),
])
def test_bad_input_names_the_argument(change, exc, match):
    args = {"x": torch.randn(2, 3, 8), "weight": torch.randn(4, 8), **change}
    with pytest.raises(exc, match=match):
        ok.fused_linear(**args)
