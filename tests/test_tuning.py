"""Launch-setting selection (onestep_kernels.tuning): the autotune switch, and every option
autotune may pick computes the op correctly. On a GPU the GPU test run turns autotune off
(ONESTEP_AUTOTUNE=0: each awkward test shape would compile and time every option), so the
options' correctness is checked here, each option forced in turn; on the CPU the same test
runs through the interpreter (which ignores the warp count, so there it checks the plumbing)."""

import pytest
import torch
from conftest import assert_close_rel, backend_device

triton = pytest.importorskip("triton", reason="triton is not installed")

from onestep_kernels import tuning  # noqa: E402
from onestep_kernels.ops import attention as attention_op  # noqa: E402
from onestep_kernels.ops import bias_gelu_tanh as bias_gelu_op  # noqa: E402
from onestep_kernels.ops import gated_residual_layernorm_modulate as gated_op  # noqa: E402
from onestep_kernels.ops import layernorm_core as core  # noqa: E402
from onestep_kernels.ops import layernorm_modulate as layernorm_op  # noqa: E402
from onestep_kernels.ops import padded_rows  # noqa: E402


@pytest.fixture
def fresh_selection(monkeypatch):
    monkeypatch.setattr(tuning, "_SELECTED", {})
    monkeypatch.setattr(tuning, "triton_interpret", lambda: False)  # as on a GPU
    return monkeypatch


def test_autotune_off_launches_the_first_option(fresh_selection):
    fresh_selection.setenv(tuning.AUTOTUNE_ENV_VAR, "0")
    kernel = layernorm_op._layernorm_modulate_fwd_kernel
    assert tuning.select(kernel, (8, 4), ("D",)) == (kernel, {"num_warps": 8})
    tiles = (((("BLOCK_M", 64),), 4, 2), ((("BLOCK_M", 128),), 8, 3))
    assert tuning.select_variants(kernel, tiles, ("N",)) == (
        kernel, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2})
    variants = padded_rows.bwd_options(2048, 2, padded_rows.LAYERNORM_MAX_PER_THREAD)
    assert tuning.select_variants(kernel, variants, ("D",)) == (
        kernel, {"PREFETCH": False, "num_warps": variants[0][1]})


def test_autotune_on_wraps_the_kernel_once_per_options_and_key(fresh_selection):
    fresh_selection.delenv(tuning.AUTOTUNE_ENV_VAR, raising=False)
    kernel = layernorm_op._layernorm_modulate_fwd_kernel
    tuner, launch_keywords = tuning.select(kernel, (8, 4), ("D",))
    assert isinstance(tuner, triton.runtime.autotuner.Autotuner) and launch_keywords == {}
    assert [c.num_warps for c in tuner.configs] == [8, 4]
    assert tuning.select(kernel, (8, 4), ("D",))[0] is tuner          # decided once
    assert tuning.select(kernel, (4,), ("D",)) == (kernel, {"num_warps": 4})  # nothing to tune
    variants = padded_rows.bwd_options(2048, 2, padded_rows.LAYERNORM_MAX_PER_THREAD)
    tuner, launch_keywords = tuning.select_variants(kernel, variants, ("D",))
    assert isinstance(tuner, triton.runtime.autotuner.Autotuner) and launch_keywords == {}
    assert [(c.kwargs, c.num_warps) for c in tuner.configs] == [
        (dict(constexprs), warps) for constexprs, warps in variants]
    assert {c.kwargs["PREFETCH"] for c in tuner.configs} == {False, True}
    tiles = (((("BLOCK_M", 64),), 4, 2), ((("BLOCK_M", 128),), 8, 3))  # with pipeline stages
    tuner, launch_keywords = tuning.select_variants(kernel, tiles, ("N",))
    assert isinstance(tuner, triton.runtime.autotuner.Autotuner) and launch_keywords == {}
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in tuner.configs] == [
        ({"BLOCK_M": 64}, 4, 2), ({"BLOCK_M": 128}, 8, 3)]


def _force_option(monkeypatch, index: int) -> None:
    """Make every launcher take option `index` (or its last) instead of autotuning."""
    def forced(kernel, options, key):
        return kernel, {"num_warps": options[min(index, len(options) - 1)]}

    def forced_variant(kernel, options, key):
        constexprs, warps = options[min(index, len(options) - 1)]
        return kernel, {**dict(constexprs), "num_warps": warps}
    monkeypatch.setattr(tuning, "select", forced)
    monkeypatch.setattr(tuning, "select_variants", forced_variant)


def _options(module, width: int, dtype: torch.dtype) -> tuple:
    """What the op's launchers may pick at this width: the longer of the LayerNorm ops'
    forward and backward warp counts, bias_gelu_tanh's warp counts."""
    size = torch.empty((), dtype=dtype).element_size()
    if module in (layernorm_op, gated_op):
        chunk = core.chunk_for(width)
        return max(core.fwd_warps(chunk, size), core.bwd_warps(chunk, size), key=len)
    return module._warps(module._block(width), size)


def _check(call, reference, inputs, dtype, what):
    ours = [t.detach().clone().requires_grad_() for t in inputs]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    out, expected = call(*ours), reference(*ref)
    out, expected = (out if isinstance(out, tuple) else (out,),
                     expected if isinstance(expected, tuple) else (expected,))
    grads = [torch.randn_like(e) for e in expected]
    torch.autograd.backward(out, [g.to(o.dtype) for g, o in zip(grads, out)])
    torch.autograd.backward(expected, grads)
    for i, (o, e) in enumerate(zip(out, expected)):
        assert_close_rel(o, e, dtype, f"{what} output {i}")
    for i, (t, r) in enumerate(zip(ours, ref)):
        assert_close_rel(t.grad, r.grad, dtype, f"{what} grad {i}")


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
D_XL, F_XL = 1152, 4608  # DiT-XL/2's width and MLP width


def _warp_cases():
    """(option, dtype) for every option index some op has at DiT-XL/2's widths (each op takes
    its last option past its own count): no case stands for an option that does not exist."""
    cases = []
    for dtype in DTYPES:
        count = max(len(_options(m, w, dtype)) for m, w in
                    ((layernorm_op, D_XL), (gated_op, D_XL), (bias_gelu_op, F_XL)))
        cases += [pytest.param(i, dtype, id=f"{i}-{str(dtype)[6:]}") for i in range(count)]
    return cases


@pytest.mark.parametrize("option,dtype", _warp_cases())
def test_every_warp_option_computes_the_ops(option, dtype, monkeypatch, generator):
    """At DiT-XL/2's widths (D=1152, MLP 4608), each warp count the launchers may pick gives
    the float64 reference's outputs and gradients, over 37 tokens: three backward programs'
    rows, the last short (five forward programs')."""
    device = backend_device("triton", "layernorm_modulate")
    D, F = D_XL, F_XL
    _force_option(monkeypatch, option)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    x, y = rand(2, 37, D), rand(2, 37, D)
    gate, shift, scale = rand(2, D), rand(2, D), rand(2, D)
    _check(lambda *a: layernorm_op.layernorm_modulate(*a, backend="triton"),
           layernorm_op.reference, (x, shift, scale), dtype, "layernorm_modulate")
    _check(lambda *a: gated_op.gated_residual_layernorm_modulate(*a, backend="triton"),
           gated_op.reference, (x, y, gate, shift, scale), dtype, "gated residual")
    per_token = rand(2, 37, D), rand(2, 37, D), rand(2, 37, D)  # the backwards' other variant
    _check(lambda *a: layernorm_op.layernorm_modulate(*a, backend="triton"),
           layernorm_op.reference, (x, *per_token[:2]), dtype, "layernorm_modulate per token")
    _check(lambda *a: gated_op.gated_residual_layernorm_modulate(*a, backend="triton"),
           gated_op.reference, (x, y, *per_token), dtype, "gated residual per token")
    _check(lambda *a: bias_gelu_op.bias_gelu_tanh(*a, backend="triton"),
           bias_gelu_op.reference, (rand(2, 3, F), rand(F)), dtype, "bias_gelu_tanh")


ATTENTION_DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# DiT-XL/2's head dim (72, split 64 + 16), 96 (64 + 32) and 40 (32 + 16)
ATTENTION_HEAD_DIMS = [72, 96, 40]


def _attention_inputs(head_dim, dtype, generator, grad=False):
    """q, k, v of 136 tokens: a partial second block at 128 rows, several at 32 or 64."""
    from conftest import backend_device

    device = backend_device("triton", "attention")
    return [torch.randn(1, 2, 136, head_dim, generator=generator).to(device, dtype)
            .requires_grad_(grad) for _ in range(3)]


def _attention_cases(options):
    """(head_dim, option, dtype) for every option `options(head_dim, dtype)` lists."""
    return [pytest.param(head_dim, i, dtype, id=f"{head_dim}-{i}-{str(dtype)[6:]}")
            for dtype in ATTENTION_DTYPES for head_dim in ATTENTION_HEAD_DIMS
            for i in range(len(options(head_dim, dtype)))]


@pytest.mark.parametrize("head_dim,option,dtype", _attention_cases(attention_op._forward_tiles))
def test_every_attention_forward_option_computes_attention(head_dim, option, dtype, monkeypatch,
                                                           generator):
    """Each forward option autotune may pick (tile and head-dim cover), at an awkward
    sequence length, gives the float64 reference's output."""
    options = attention_op._forward_tiles(head_dim, dtype)
    constexprs, warps, stages = options[option]
    monkeypatch.setattr(tuning, "select_variants", lambda kernel, tiles, key: (
        kernel, {**dict(constexprs), "num_warps": warps, "num_stages": stages}))
    q, k, v = _attention_inputs(head_dim, dtype, generator)
    out = attention_op.attention(q, k, v, backend="triton")
    expected = attention_op.reference(q.double(), k.double(), v.double(), head_dim ** -0.5)
    assert_close_rel(out, expected, dtype, f"attention, option {constexprs}")


@pytest.mark.parametrize("head_dim,option,dtype", _attention_cases(
    lambda head_dim, dtype: attention_op._backward_options("dq", head_dim, dtype)))
def test_every_attention_dq_option_computes_the_gradients(head_dim, option, dtype, monkeypatch,
                                                          generator):
    _check_attention_backward_option("dq", head_dim, option, dtype, monkeypatch, generator)


@pytest.mark.parametrize("head_dim,option,dtype", _attention_cases(
    lambda head_dim, dtype: attention_op._backward_options("dkdv", head_dim, dtype)))
def test_every_attention_dkdv_option_computes_the_gradients(head_dim, option, dtype,
                                                            monkeypatch, generator):
    _check_attention_backward_option("dkdv", head_dim, option, dtype, monkeypatch, generator)


def _check_attention_backward_option(kernel, head_dim, option, dtype, monkeypatch, generator):
    """Each option of each backward kernel (tile, head dim in one block or two) gives the
    float64 reference's gradients (the other kernels on their fixed options)."""
    options = attention_op._backward_options(kernel, head_dim, dtype)
    target = {"dq": attention_op._attention_bwd_dq_kernel,
              "dkdv": attention_op._attention_bwd_dkdv_kernel}[kernel]

    def forced(launched, tiles, key):
        constexprs, warps, stages = options[option] if launched is target else tiles[0]
        return launched, {**dict(constexprs), "num_warps": warps, "num_stages": stages}

    monkeypatch.setattr(tuning, "select_variants", forced)
    inputs = _attention_inputs(head_dim, dtype, generator, grad=True)
    dout = torch.randn(inputs[0].shape, generator=generator).to(inputs[0].device, dtype)
    attention_op.attention(*inputs, backend="triton").backward(dout)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in inputs]
    attention_op.reference(*ref_in, head_dim ** -0.5).backward(dout.double().cpu())
    for name, t, r in zip("qkv", inputs, ref_in):
        assert_close_rel(t.grad, r.grad, dtype, f"d{name}, {kernel} option {options[option]}")
