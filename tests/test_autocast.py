"""Every op and FusedDiTBlock under autocast and with mixed input dtypes: the same dtype and
values as their reference expressions (CPU bf16 autocast without a GPU; CUDA bf16 autocast
on CUDA tensors with one)."""

import inspect

import pytest
import torch
from conftest import assert_close_rel, backend_device
from test_layers import randomised

import onestep_kernels as ok
from onestep_kernels.dispatch import OPS
from onestep_kernels.layers import DiTBlock, FusedDiTBlock
from onestep_kernels.op_spec import Sizes

BF16 = torch.bfloat16
DEVICE = backend_device("triton", "layernorm_modulate")  # the GPU when there is one


def autocast():
    return torch.autocast(DEVICE.type, dtype=BF16)


SIZES = Sizes(B=2, N=7, D=48, H=2, F=48)


def _example(op, generator):
    return op.spec.example(SIZES, DEVICE, torch.float32, generator)


# Every op whose example call takes its tensors alone (fused_linear's takes keyword arguments,
# and its fused kernel refuses autocast: tests/ops/test_fused_linear.py covers it).
OP_NAMES = [op.name for op in OPS.values() if op.spec.example is not None
            and not _example(op, torch.Generator(device=DEVICE))[1]]


def cases(generator):
    """op name -> (onestep call, reference expression, fp32 inputs): each op's public function
    and its PyTorch backend's expression (the reference, or SDPA for attention) with the
    public function's default parameters, on its example's tensors."""
    generator = torch.Generator(device=DEVICE).manual_seed(generator.initial_seed())
    found = {}
    for name in OP_NAMES:
        op = OPS[name]
        defaults = inspect.signature(op.public).parameters
        params = [defaults[p].default for p, _ in op.spec.params]
        expression = op[op.torch_alias].expression
        args, _ = _example(op, generator)
        found[name] = (op.public, lambda *a, e=expression, p=params: e(*a, *p),
                       [t.clone() for t in args])
    return found


def outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("half_inputs", ["none", "modulation"])
def test_ops_follow_autocast_like_their_references(op, half_inputs, generator):
    """Under autocast, with fp32 inputs or some of them in bf16 (as adaLN's Linear gives), the
    op returns the reference's dtype and values, forward and backward."""
    fn, reference, inputs = cases(generator)[op]
    if half_inputs == "modulation":
        inputs = [inputs[0]] + [t.to(BF16) for t in inputs[1:]]
    ours = [t.clone().requires_grad_() for t in inputs]
    theirs = [t.clone().requires_grad_() for t in inputs]
    with autocast():
        out = outputs(fn(*ours))
        ref = outputs(reference(*theirs))
    assert [o.dtype for o in out] == [r.dtype for r in ref]
    torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    torch.autograd.backward(ref, [torch.ones_like(r) for r in ref])
    low = any(t.dtype == BF16 for t in [*out, *inputs])
    for o, r in zip(out, ref):
        assert_close_rel(o.float(), r.double(), BF16 if low else torch.float32, f"{op} out")
    for a, b in zip(ours, theirs):
        assert a.grad.dtype == b.grad.dtype
        assert_close_rel(a.grad.float(), b.grad.double(), BF16, f"{op} grad")


@pytest.mark.parametrize("op", OP_NAMES)
def test_mixed_dtypes_are_promoted(op, generator):
    """Without autocast, inputs of several float dtypes compute in their promoted dtype."""
    fn, reference, inputs = cases(generator)[op]
    mixed = [inputs[0]] + [t.to(BF16) for t in inputs[1:]]
    out = outputs(fn(*mixed))
    ref = outputs(reference(*(t.cpu().double() for t in mixed)))
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32
        assert_close_rel(o, r, torch.float32, f"{op} promoted")


def test_float64_runs_the_reference(generator):
    x, shift, scale = (torch.randn(s, generator=generator, dtype=torch.float64)
                       for s in ((2, 3, 16), (2, 16), (2, 16)))
    out = ok.layernorm_modulate(x, shift, scale)
    assert out.dtype == torch.float64
    assert torch.equal(out, OPS["layernorm_modulate"]["reference"].expression(x, shift, scale))


def test_fused_block_follows_autocast_like_the_reference_block(generator):
    B, N, D, H = 2, 16, 64, 4
    fused = randomised(FusedDiTBlock(D, H), generator).to(DEVICE)
    reference = DiTBlock(D, H).to(DEVICE)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, N, D, generator=generator).to(DEVICE)
    c = torch.randn(B, D, generator=generator).to(DEVICE)
    results = []
    for block in (fused, reference):
        xi = x.clone().requires_grad_()
        with autocast():
            out = block(xi, c)
        out.float().square().sum().backward()
        results.append((out, xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    (out, dx, grads), (ref, ref_dx, ref_grads) = results
    assert out.dtype == ref.dtype == torch.float32
    assert_close_rel(out, ref.double(), BF16, "out")
    assert_close_rel(dx, ref_dx.double(), BF16, "dx")
    for name, g in grads.items():
        assert g.dtype == ref_grads[name].dtype, name
        assert_close_rel(g, ref_grads[name].double(), BF16, f"d{name}")


def test_fused_flow_dit_trains_a_step_under_autocast(generator):
    """What the trainer does on a GPU by default (bf16 autocast around the loss), on the CPU:
    a fused FlowDiT's loss and every gradient are finite and close to the unfused model's."""
    from onestep_models.dit import FlowDiT

    torch.manual_seed(0)
    models = [FlowDiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2,
                      num_heads=4, num_classes=10, fused=fused) for fused in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        randomised(model, generator)
    models[1].load_state_dict(models[0].state_dict())
    models = [model.to(DEVICE) for model in models]
    x = torch.randn(4, 1, 8, 8, generator=generator).to(DEVICE)
    t = torch.rand(4, generator=generator).to(DEVICE)
    y = torch.randint(0, 10, (4,), generator=generator).to(DEVICE)
    grads = []
    for model in models:
        with autocast():
            loss = model(x, t, y).float().square().mean()
        loss.backward()
        assert torch.isfinite(loss)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.isfinite(grads[0][name]).all(), name
        assert_close_rel(grads[0][name], grads[1][name].double(), BF16, name)
