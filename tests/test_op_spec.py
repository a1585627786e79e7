"""The op factory (onestep_kernels.op_spec): an op declared once, from a spec and its records,
reaches every list of ops the project keeps; the launch boundary refuses what a kernel cannot
read on every path, the inner layers and a DiT block's included."""

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import backend_matrix

import onestep_gpu_check as gpu_check
import onestep_kernels as ok
from onestep_kernels import aot, dispatch, measure, optable
from onestep_kernels.dispatch import ANY_DEVICE, OPS, Backend
from onestep_kernels.op_spec import Op, OpSpec

_names = (f"throwaway_{i}" for i in itertools.count())


@pytest.fixture
def throwaway():
    """A new op with its reference only: scale(x, alpha) = alpha * x, memory-bound, with an
    example call; removed from the registry afterwards (torch.library keeps no op of it: a
    PyTorch expression is traced as it is)."""
    name = next(_names)

    def reference(x, alpha):
        return x * alpha

    spec = OpSpec(name, inputs=("x",), params=(("alpha", float),), outputs=("out",),
                  allocate=lambda backend, keep, x, alpha: (torch.empty_like(x),),
                  memory_bound=True, eager=lambda x: x * 2.0,
                  example=lambda sizes, device, dtype, generator: (
                      (torch.randn(sizes.B, sizes.N, sizes.D, generator=generator,
                                   device=device).to(dtype),), {}))
    op = Op(spec, [Backend("reference", "torch", ANY_DEVICE, dtypes=dispatch.ALL_DTYPES,
                           expression=reference, summary="alpha * x")],
            default_order={"cpu": ("reference",)})

    @op.public_entry
    def scale(x, alpha=2.0, *, backend=None):
        grad = x.requires_grad and torch.is_grad_enabled()
        return op.apply(op.resolve(backend, x.device, x.dtype, x.shape[-1], grad), x, alpha,
                        grad=grad)

    try:
        yield op
    finally:
        del OPS[name]
        dispatch.clear_cache()


def test_a_new_op_is_in_every_list_of_ops(throwaway):
    name = throwaway.name
    assert OPS[name] is throwaway
    x = torch.randn(2, 3, 8)
    assert torch.equal(throwaway.public(x), 2 * x)
    assert ok.backend_choices("cpu")[name]["chosen"] == "reference"
    assert f"| `{name}` | `reference` |" in optable.table()  # the README's table
    assert name in measure.example_calls(torch.device("cpu"))  # the measured default orders
    s = gpu_check.smoke_setting()
    assert name in [case[0] for case in gpu_check.rows._memory_bound_cases(s)]  # GPU pass
    row = gpu_check.Row("host", s, {})
    gpu_check.rows.row_host(row)
    assert name in [r["contender"] for r in row.records]
    assert [c.values[0] for c in backend_matrix(name)] == ["reference"] * 3  # the tests' matrix
    list(aot.configs())  # (no Triton kernel: nothing of it to compile, and nothing breaks)


def test_names_must_not_collide_with_the_hot_paths_own():
    with pytest.raises(ValueError, match="must differ"):
        Op(OpSpec("clashing", inputs=("x",), params=(("keep", float),), outputs=("out",),
                  allocate=lambda *a: None),
           [Backend("reference", "torch", ANY_DEVICE, expression=lambda x, keep: x)])
    assert "clashing" not in OPS  # refused before it was registered


def test_the_hot_path_is_written_out_per_op():
    source = OPS["layernorm_modulate"].source
    assert "def forward(backend, x, shift, scale, eps, keep=False" in source
    assert "shift.device != device" in source and "x.is_meta" in source
    assert "ctx.save_for_backward(x, scale, stats)" in source


# ---- the launch boundary --------------------------------------------------------------------

ARGS = {"layernorm_modulate": lambda: (torch.randn(2, 3, 8), torch.randn(2, 8),
                                       torch.randn(2, 8), 1e-6),
        "gated_residual_layernorm_modulate": lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8),
                                                      torch.randn(2, 8), torch.randn(2, 8),
                                                      torch.randn(2, 8), 1e-6),
        "bias_gelu_tanh": lambda: (torch.randn(3, 8), torch.randn(8)),
        "attention": lambda: (torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16),
                              torch.randn(1, 2, 3, 16), 0.25),
        # (the class head's inputs; the cosine's `other`: tests/ops/test_score_candidates.py)
        "score_candidates": lambda: (torch.randn(6, 3, 8), None, torch.randn(5, 8),
                                     torch.randn(5), torch.tensor([1, 4]), 3, 2)}


@pytest.mark.parametrize("op", list(ARGS))
def test_the_inner_layer_refuses_a_meta_tensor_by_name(op):
    """The inner layer (what blocks and integrations call, no public validation before it)
    refuses, on every kernel backend here, each input on the meta device, by its name."""
    record = OPS[op]["cpu"]
    names = OPS[op].spec.input_names
    for i, name in enumerate(names):
        args = list(ARGS[op]())
        if args[i] is None:
            continue
        args[i] = torch.empty(args[i].shape, dtype=args[i].dtype, device="meta")
        for call in (lambda: OPS[op].apply(record, *args, grad=False),
                     lambda: OPS[op].apply(record, *args, grad=True),
                     lambda: OPS[op].forward(record, *args)):
            with pytest.raises(ValueError, match=f"^{name}: is on the meta device"):
                call()


@pytest.mark.parametrize("op", list(ARGS))
def test_the_inner_layer_refuses_a_row_it_cannot_read(op):
    args = list(ARGS[op]())
    args[0] = torch.randn(*reversed(args[0].shape)).transpose(0, -1)  # last dimension strided
    first = OPS[op].spec.input_names[0]
    with pytest.raises(ValueError, match=f"^{first}: a kernel reads it as rows"):
        OPS[op].forward(OPS[op]["cpu"], *args)


def test_an_offloaded_fc1_is_an_error_not_a_crash():
    """accelerate's cpu_offload leaves a Linear's weights on the meta device and moves them in
    only through its replaced forward; read directly, the meta bias used to reach the native
    bias+GELU kernel, which died with a segmentation fault. In a process of its own, so that a
    crash fails the test instead of ending the run."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import torch
        from onestep_kernels.layers import DiTBlock, dit_block_forward
        block = DiTBlock(32, 2)
        fc1 = block.mlp.fc1.to("meta")  # what cpu_offload leaves behind the hook
        x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
        for grad in (False, True):
            try:
                with torch.set_grad_enabled(grad):
                    dit_block_forward(x.requires_grad_(grad), block.adaLN_modulation(c),
                                      block.attn, fc1, block.mlp.fc2)
            except ValueError as error:
                print(error)
    """)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all("is on the meta device" in line for line in lines), lines
