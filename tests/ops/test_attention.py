"""attention: the CPU C++ kernels (both instruction sets), the Triton flash-attention kernels
(through the interpreter here) and the SDPA backend against a float64 softmax(q k^T) v, forward
and all three gradients, including head dim 72, single tokens, key counts that differ from
query counts and cross the C++ backward's key chunks, and strided q/k/v views."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close_rel,
    backend_device,
    poisoned_backward,
    poisoned_forward,
    refused,
    rel_error,
    to_backend,
)
from einops import rearrange

import onestep_kernels as ok
from onestep_kernels.ops import attention as op

SHAPES = [(1, 1, 1, 1), (2, 3, 37, 37), (1, 2, 5, 70), (2, 1, 130, 17)]  # (B, H, N, Nk)


def make(B, H, N, NK, Dh, dtype, generator):
    q = torch.randn(B, H, N, Dh, generator=generator, dtype=torch.float64)
    k = torch.randn(B, H, NK, Dh, generator=generator, dtype=torch.float64) * 1.5
    v = torch.randn(B, H, NK, Dh, generator=generator, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)]


def check(backend, q, k, v, generator, scale=None):
    """The backend's output and gradients against float64 on the CPU; q, k, v are moved to the
    backend's device (views stay views where they already live there). In bfloat16 an error up
    to twice SDPA's own in bfloat16 also passes (flash-attention's rule)."""
    dtype = q.dtype
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = op.reference(*ref_in, scale=scale)
    dy = torch.randn(ref.shape, generator=generator).to(dtype)
    ref.backward(dy.double())
    test_in = [t.to(backend_device(backend, "attention")).detach().requires_grad_()
               for t in (q, k, v)]
    out = ok.attention(*test_in, scale=scale, backend=backend)
    out.backward(dy.to(out.device))
    assert out.dtype == dtype
    torch_errors = [None] * 4
    if dtype == torch.bfloat16:
        torch_in = [t.detach().clone().requires_grad_() for t in test_in]
        torch_out = F.scaled_dot_product_attention(*torch_in, scale=scale)
        torch_out.backward(dy.to(out.device))
        torch_errors = [rel_error(a.detach().cpu(), b) for a, b in
                        zip([torch_out] + [t.grad for t in torch_in], [ref] + [r.grad for r in ref_in])]
    assert_close_rel(out, ref, dtype, "out", torch_errors[0])
    for name, t, r, e in zip("qkv", test_in, ref_in, torch_errors[1:]):
        assert_close_rel(t.grad, r.grad, dtype, f"d{name}", e)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("Dh", [32, 40, 64, 72, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_float64_reference(dtype, Dh, shape, generator):
    q, k, v = to_backend("triton", "attention", *make(*shape, Dh, dtype, generator))
    if reason := refused("attention", "triton", q.device, dtype, Dh):
        assert dtype == torch.float32 and Dh > op.MAX_HEAD_DIM_FP32, reason
        with pytest.raises(ValueError, match=re.escape(reason)):
            ok.attention(q, k, v, backend="triton")
        return
    check("triton", q, k, v, generator)


# (B, H, N, Nk): the C++ backward walks keys in chunks of 256 and queries in blocks of 64, the
# forward queries in blocks of 6; these cross every such boundary with remainders.
CPU_SHAPES = SHAPES + [(1, 2, 67, 600), (2, 1, 300, 259)]


@pytest.mark.parametrize("isa", ["avx2", "base"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("Dh", [1, 24, 64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_matches_float64_reference(dtype, Dh, shape, isa, generator, cpu_isa):
    cpu_isa(isa)
    check("cpu", *make(*shape, Dh, dtype, generator), generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdpa_backend_matches_float64_reference(dtype, generator):
    check("sdpa", *make(2, 3, 37, 41, 72, dtype, generator), generator)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_custom_scale_and_strided_views(backend, generator):
    """q, k, v as views of one fused QKV projection, as a DiT block makes them."""
    B, N, H, Dh = 2, 19, 3, 40
    qkv = torch.randn(B, N, 3 * H * Dh, generator=generator).to(backend_device(backend, "attention"))
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=H)
    assert not q.is_contiguous()
    check(backend, q, k, v, generator, scale=0.3)


def test_cpu_output_merges_heads_without_a_copy(generator):
    """The cpu kernel writes (B, N, H, Dh) memory, so "b h n d -> b n (h d)" is a view, and a
    gradient arriving in that layout is read in place."""
    q, k, v = (t.requires_grad_() for t in make(2, 3, 19, 23, 24, torch.float32, generator))
    out = ok.attention(q, k, v, backend="cpu")
    merged = rearrange(out, "b h n d -> b n (h d)")
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()
    dmerged = torch.randn(merged.shape, generator=generator)
    merged.backward(dmerged)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rearrange(op.reference(*ref_in), "b h n d -> b n (h d)").backward(dmerged.double())
    for name, t, r in zip("qkv", (q, k, v), ref_in):
        assert_close_rel(t.grad, r.grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_launchers_write_every_element(backend, generator):
    """Outputs start as NaN: an element a kernel forgets to write fails the test."""
    q, k, v = to_backend(backend, "attention", *make(2, 3, 37, 41, 24, torch.float32, generator))
    out, lse = poisoned_forward("attention", backend, (q, k, v, 0.3))
    grads = poisoned_backward("attention", backend, (torch.randn_like(out),),
                              (q, k, v, out, lse), (0.3,))
    for name, t in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, *grads]):
        assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deterministic_backward(backend, generator):
    """Bitwise equal gradients on a second run and (cpu) with another thread count."""
    q, k, v, dy = to_backend(backend, "attention", *make(2, 2, 70, 300, 32, torch.float32, generator),
                             torch.randn(2, 2, 70, 32, generator=generator))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grads = []
    threads = torch.get_num_threads()
    for num_threads in (threads, 1 if backend == "cpu" else threads):
        torch.set_num_threads(num_threads)
        try:
            for t in (q, k, v):
                t.grad = None
            ok.attention(q, k, v, backend=backend).backward(dy)
        finally:
            torch.set_num_threads(threads)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend, generator):
    q, k, v = (t.requires_grad_() for t in to_backend(
        backend, "attention", *make(1, 2, 9, 11, 32, torch.float32, generator)))
    torch.library.opcheck(torch.ops.onestep.attention_fwd.default, (q, k, v, 0.2, backend))
    with torch.no_grad():
        out, lse = torch.ops.onestep.attention_fwd(q, k, v, 0.2, backend)
    dout = torch.randn(1, 2, 9, 32, generator=generator).to(q.device)
    torch.library.opcheck(torch.ops.onestep.attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.2, backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend, generator):
    q, k, v = (t.requires_grad_() for t in to_backend(
        backend, "attention", *make(1, 2, 9, 9, 32, torch.float32, generator)))
    loss = torch.compile(lambda q, k, v: ok.attention(q, k, v, backend=backend).sum(),
                         fullgraph=True)(q, k, v)
    loss.backward()
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    op.reference(*ref_in).sum().backward()
    for t, r in zip((q, k, v), ref_in):
        assert_close_rel(t.grad, r.grad, torch.float32, "grad")


def test_cpu_launchers_take_an_empty_batch():
    """Called directly (the op returns early itself), B * H == 0 is a no-op, not a crash."""
    from onestep_kernels import native
    t = torch.empty(0, 1, 4, 8)
    p = t.data_ptr()
    strides = {f"{n}_{d}": 0 for n in ("q", "k", "v", "out", "dout") for d in ("sb", "sh", "sn")}
    sizes = dict(B=0, H=1, N=4, NK=4, D=8, scale=1.0, dtype=0)
    fwd = native.params_type("AttentionFwdParams")(
        q=p, k=p, v=p, out=p, lse=p, **sizes,
        **{k: v for k, v in strides.items() if not k.startswith("dout")})
    bwd = native.params_type("AttentionBwdParams")(
        dout=p, q=p, k=p, v=p, out=p, lse=p, dq=p, dk=p, dv=p, **sizes, **strides)
    assert native.cpu_module.attention_fwd(fwd, 2) == 0
    assert native.cpu_module.attention_bwd(bwd, 2) == 0


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_keys_gives_zeros(backend):
    device = backend_device(backend, "attention")
    q = torch.randn(1, 1, 3, 32, device=device, requires_grad=True)
    k = torch.randn(1, 1, 0, 32, device=device)
    out = ok.attention(q, k, k.clone(), backend=backend)
    assert torch.equal(out, torch.zeros(1, 1, 3, 32, device=device))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "q:"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)), ValueError, "k:"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)), ValueError, "v:"),
    ((torch.randn(1, 2, 3, 8).int(), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)), TypeError, "q:"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8, device="meta"), torch.randn(1, 2, 3, 8)),
     ValueError, "k:"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8, device="meta")),
     ValueError, "v:"),
    ((torch.randn(1, 2, 3, 0), torch.randn(1, 2, 3, 0), torch.randn(1, 2, 3, 0)), ValueError,
     "q: the head dimension"),
])
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        ok.attention(*args)


def test_backend_limits():
    q = torch.randn(1, 1, 4, 8, device=backend_device("triton", "attention"))
    with pytest.raises(ValueError, match=r"takes head dim in 16\.\.64 for float32, got head dim=8"):
        ok.attention(q, q, q, backend="triton")  # Dh 8 < 16
    with pytest.raises(ValueError, match="attention has no backend 'cuda'"):
        ok.attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="scale:"):
        ok.attention(q, q, q, scale=-1.0)
    assert ok.attention(q, q, q).shape == q.shape  # default on the CPU: SDPA
