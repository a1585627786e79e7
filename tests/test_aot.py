"""Compile-only GPU checks: every Triton configuration the launchers can pick builds for
sm_80/sm_90 without spills, and the registry covers what the launchers pick."""

import os
import subprocess
import sys
import textwrap

import pytest

from onestep_kernels.dispatch import OPS

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")


# The ops whose Triton kernels go over rows (a block of the row width, warps by size): the
# memory-bound ones, whose modules pick launch settings with _block and _warps.
ROW_OPS = [sys.modules[op.triton_configs.__module__] for op in OPS.values()
           if op.spec.memory_bound and op.triton_configs is not None]


@pytest.mark.parametrize("module", ROW_OPS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_registry_covers_every_launch_config(module):
    """For each row width and dtype, every warp count autotune may pick (and the first, which
    the interpreter runs) is a listed (dtype, block, warps) configuration."""
    from onestep_kernels import tuning

    listed = {(c.dtype, c.constexprs.get("BLOCK_D", c.constexprs.get("BLOCK_F")), c.num_warps)
              for c in module.triton_configs()}
    for D in range(1, getattr(module, "MAX_TRITON_D", 8192) + 1):
        block = module._block(D)
        for dtype, size in tuning.ELEMENT_BYTES.items():
            for warps in module._warps(block, size):
                assert (dtype, block, warps) in listed, (D, dtype, warps)


def test_warp_options_move_whole_vectors_within_the_register_budget():
    from onestep_kernels import tuning

    rows = tuning.ROW_WARPS
    assert tuning.warps_options(2048, 2, 16, rows) == (8, 4)   # 8 or 16 bf16 per thread
    assert tuning.warps_options(2048, 2, 8, rows) == (8,)
    assert tuning.warps_options(4096, 4, 16, rows) == (8,)     # 16 warps would spill
    assert tuning.warps_options(2048, 4, 16, rows) == (8, 4)
    assert tuning.warps_options(1024, 2, 16) == (4, 2)
    assert tuning.warps_options(256, 2, 8, rows) == (2,)       # no whole vector: most per thread
    assert tuning.warps_options(16, 2, 16) == (1,)


def test_attention_registry_covers_every_launch_config():
    """Every option the attention launchers can pick (tiles and head-dim covers), for every
    head dim and dtype."""
    import torch

    from onestep_kernels.ops import attention

    listed = {(c.kernel, c.dtype, tuple(sorted(c.constexprs.items())), c.num_warps, c.num_stages)
              for c in attention.triton_configs()}
    for dtype, name in attention._TRITON_DTYPES.items():
        ieee = dtype == torch.float32
        top = attention.MAX_HEAD_DIM_FP32 if dtype == torch.float32 else attention.MAX_HEAD_DIM
        for head_dim in range(attention.MIN_HEAD_DIM, top + 1):
            for kernel, options in (
                    (attention._attention_fwd_kernel, attention._forward_tiles(head_dim, dtype)),
                    (attention._attention_bwd_dq_kernel,
                     attention._backward_options("dq", head_dim, dtype)),
                    (attention._attention_bwd_dkdv_kernel,
                     attention._backward_options("dkdv", head_dim, dtype))):
                for constexprs, warps, stages in options:
                    constexprs = {**dict(constexprs), "IEEE": ieee}
                    key = (kernel, name, tuple(sorted(constexprs.items())), warps, stages)
                    assert key in listed, (dtype, head_dim, kernel.__name__, constexprs)
            block_d = max(16, 1 << (head_dim - 1).bit_length())
            delta = {"BLOCK_R": attention.DELTA_BLOCK // block_d, "BLOCK_D": block_d}
            assert (attention._attention_bwd_delta_kernel, name, tuple(sorted(delta.items())),
                    4, 3) in listed, (dtype, head_dim, "delta")


def test_attention_covers_split_the_head_dims_a_power_of_two_pads():
    import torch

    from onestep_kernels.ops import attention

    def covers(head_dim, dtype=torch.float16):
        return [(c["BLOCK_D"], c["BLOCK_E"]) for c in attention._covers(head_dim, dtype)]

    assert covers(72) == [(128, 0), (64, 16)]  # DiT-XL/2
    assert covers(96) == [(128, 0), (64, 32)]
    assert covers(40) == [(64, 0), (32, 16)]
    assert covers(64) == [(64, 0)] and covers(100) == [(128, 0)] and covers(20) == [(32, 0)]
    assert covers(72, torch.float32) == [(128, 0)]
    for head_dim in range(attention.MIN_HEAD_DIM, attention.MAX_HEAD_DIM + 1):
        for d, e in covers(head_dim):
            assert d + e >= head_dim and (e == 0 or d < head_dim), head_dim


def test_signatures_are_derived_from_the_kernels():
    """Every kernel parameter gets a type: pointers of the config's dtype (fp32 where named),
    int32 sizes and strides, float scalars, and the constexprs."""
    from onestep_kernels import aot

    for config in aot.configs():  # (K is attention's key pointer, never a size)
        signature = config.signature()
        assert list(signature) == list(config.kernel.arg_names), config.name
        named = set(config.fp32) & set(signature)
        assert named <= {a for a, t in signature.items() if t == "*fp32"}, config.name
        assert {a for a, t in signature.items() if t == "constexpr"} == set(config.constexprs)
        assert any(t == f"*{config.dtype}" for t in signature.values()), config.name


@pytest.mark.slow
def test_every_triton_config_compiles_for_sm80_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-m", "onestep_kernels.aot"], capture_output=True,
                            text=True, env=env, timeout=1200)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-5000:]
    assert " 0 failed" in report
    assert "sm_80 " in report and "sm_90 " in report


def test_fused_linear_registry_covers_every_variant():
    import itertools

    from onestep_kernels.ops import fused_linear

    listed = {(c.dtype, c.constexprs["NORM"], c.constexprs["GELU"], c.constexprs["GATED"],
               c.constexprs["HAS_BIAS"], c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"],
               c.constexprs["BLOCK_K"], c.num_warps) for c in fused_linear.triton_configs()}
    for dtype, name in fused_linear._TRITON_DTYPES.items():
        cfg = fused_linear._launch_config(dtype)
        for flags in itertools.product((False, True), repeat=4):
            key = (name, *flags, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"],
                   cfg["num_warps"])
            assert key in listed, (dtype, flags)


@pytest.mark.slow
def test_memory_bound_kernels_move_128_bit_vectors_at_dit_widths():
    """The sm_90 PTX of every memory-bound configuration at DiT widths moves its rows in
    128-bit loads and stores; and the check catches a configuration that does not (8 warps
    over a 1024-wide bf16 block: 4 elements, 64 bits, per thread)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-m", "onestep_kernels.aot", "--vectors"],
                            capture_output=True, text=True, env=env, timeout=1200)
    report = result.stdout + result.stderr
    assert result.returncode == 0 and " 0 failed" in report, report[-5000:]
    narrow = textwrap.dedent("""
        import dataclasses
        from onestep_kernels import aot
        config = next(c for c in aot.configs() if c.name.startswith("bias_gelu_tanh_fwd[bf16,BLOCK_F=1024"))
        print(aot.vector_problem(dataclasses.replace(config, num_warps=8), 0)[1])
    """)
    result = subprocess.run([sys.executable, "-c", narrow], capture_output=True, text=True,
                            env=env, timeout=600)
    assert "narrow: [64" in result.stdout, result.stdout + result.stderr[-3000:]



def test_inductor_can_rebuild_every_kernel_from_its_source(tmp_path):
    """torch.compile's path for the Triton backends: each kernel survives inductor's copy of
    its source; and the check catches a kernel that calls a jit function through a module
    attribute (what failed on the H100 with "core is not defined")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "onestep_kernels.aot", "--inductor"],
                            capture_output=True, text=True, env=env, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0 and " 0 failed" in report, report[-5000:]
    assert report.count("inductor ") >= 10, report  # every op's kernels were checked
    (tmp_path / "helpers.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def twice(x):
            return 2 * x
    """))
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        import helpers

        @triton.jit
        def kernel(X, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            tl.store(X + offsets, helpers.twice(tl.load(X + offsets)))
    """))
    script = ("import bad_kernel; from onestep_kernels.aot import inductor_problem; "
              "print(inductor_problem(bad_kernel.kernel))")
    planted = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**env, "PYTHONPATH": f"{tmp_path}:{os.getcwd()}"}, timeout=300)
    assert "helpers" in planted.stdout, planted.stdout + planted.stderr
