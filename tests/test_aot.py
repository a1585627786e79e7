"""Compile-only GPU checks: every Triton configuration the launchers can pick builds for
sm_80/sm_90 without spills, and the registry covers what the launchers pick."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")


def _listed(configs):
    return {(c.kernel, c.dtype, c.constexprs.get("CHUNK", c.constexprs.get("BLOCK_D",
             c.constexprs.get("BLOCK_F"))), c.num_warps) for c in configs}


def test_registry_covers_every_launch_config():
    """For each row width up to 8192 and each dtype, every warp count autotune may pick (and
    the first, which the interpreter runs) for the tile the launcher picks is a listed
    configuration: the chunked LayerNorm ops, their padded predecessors, bias_gelu_tanh."""
    from onestep_kernels import tuning
    from onestep_kernels.ops import bias_gelu_tanh as gelu
    from onestep_kernels.ops import gated_residual_layernorm_modulate as gated
    from onestep_kernels.ops import layernorm_core as core
    from onestep_kernels.ops import layernorm_modulate as layernorm
    from onestep_kernels.ops import padded_rows as padded

    listed = _listed([*layernorm.triton_configs(), *gated.triton_configs(),
                      *gelu.triton_configs()])
    chunked = [(m, getattr(m, f"_{m.__name__.rsplit('.', 1)[-1]}_fwd_kernel"),
                getattr(m, f"_{m.__name__.rsplit('.', 1)[-1]}_bwd_kernel"))
               for m in (layernorm, gated)]
    for D in range(1, 8193):
        chunk = core.chunk_for(D)
        for dtype, size in tuning.ELEMENT_BYTES.items():
            for module, fwd, bwd in chunked:
                for kernel, warps in ((fwd, core.fwd_warps(chunk, size)),
                                      (bwd, core.bwd_warps(chunk, size))):
                    for w in warps:
                        assert (kernel, dtype, chunk, w) in listed, (D, dtype, kernel, w)
            block = gelu._block(D)
            for w in gelu._warps(block, size):
                assert (gelu._bias_gelu_tanh_fwd_kernel, dtype, block, w) in listed, (D, w)
            for top, warps, kernel in (
                    (padded.LAYERNORM_MAX_D, padded._layernorm_warps,
                     padded._padded_layernorm_modulate_fwd_kernel),
                    (padded.GATED_MAX_D, padded._gated_warps,
                     padded._padded_gated_residual_layernorm_modulate_fwd_kernel)):
                if D <= top:
                    for w in warps(padded.row_block(D), size):
                        assert (kernel, dtype, padded.row_block(D), w) in listed, (D, w)


def test_chunks_tile_the_widths_of_real_models():
    """128-wide chunks tile every DiT-family width exactly; narrow or odd rows take the chunk
    with the most useful lanes; bias_gelu_tanh's blocks leave at most 10% idle at MLP widths."""
    from onestep_kernels.ops import bias_gelu_tanh as gelu
    from onestep_kernels.ops import layernorm_core as core

    for D in (384, 1152, 1536, 2432, 3072, 4096, 8192):
        assert core.chunk_for(D) == 128 and core.useful_share(D, 128) == 1.0
    assert core.chunk_for(1000) == 128 and core.chunk_for(64) == 64
    assert core.chunk_for(200) == 32  # 128 and 64 leave 22% idle, 32 leaves 11%
    assert core.chunk_for(8) == 16
    assert gelu._block(4608) == 1024 and gelu._block(1536) == 512
    for F in (1536, 4608, 6144, 9728, 12288):
        assert core.useful_share(F, gelu._block(F)) >= 0.9, F


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
def test_memory_bound_launches_pass_the_offline_checks():
    """What the memory-bound ops' launchers pick at the widths of real models (1152, 1536,
    2432, 3072, 384, 4096; 4x for bias_gelu_tanh) passes aot's checks: useful lanes, 128-bit
    accesses, no spills, the backward's grid."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-m", "onestep_kernels.aot", "--memory-bound"],
                            capture_output=True, text=True, env=env, timeout=1200)
    report = result.stdout + result.stderr
    assert result.returncode == 0 and " 0 failed" in report, report[-5000:]
    for width in (1152, 1536, 2432, 3072, 384, 4096, 4608):
        assert f"at width {width}: ok" in report, width
    from onestep_kernels import native

    if native.CUDA_LIBRARY_PATH.exists():  # the CUDA C++ kernels' rows too
        assert "cuda layernorm backward[bf16] at width 1152 (tile 32 x 5 x 8): ok" in report
        assert report.count("cuda sm_90 ") >= 18, report[-3000:]


@pytest.mark.slow
def test_each_offline_check_catches_a_kernel_that_breaks_it():
    """Each of aot's memory-bound checks fails a launch that breaks it: the padded kernels'
    2048-wide tile at D = 1152 (56% of the lanes useful); 8 warps over a 1024-wide bf16 block
    (64-bit accesses); the gated per-token backward at 2 warps in fp32 (32 elements per thread
    and tensor: it spills); a backward of 64 rows per program (128 programs at 8192 rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    planted = textwrap.dedent("""
        import dataclasses
        from onestep_kernels import aot
        from onestep_kernels.kernel_config import Launch
        configs = {c.name: c for c in aot.configs()}
        padded = configs["padded_layernorm_modulate_fwd[bf16,BLOCK_D=2048,KEEP_STATS=False,warps=8]"]
        print("lanes:", aot.lanes_problem(Launch(padded, 1152)))
        gelu = configs["bias_gelu_tanh_fwd[bf16,BLOCK_F=1024,warps=4]"]
        print("vectors:", aot.launch_problems(Launch(dataclasses.replace(gelu, num_warps=8), 4096)))
        gated = configs["gated_residual_layernorm_modulate_bwd[fp32,CHUNK=128,PER_TOKEN=True,warps=16]"]
        print("spills:", aot.launch_problems(Launch(dataclasses.replace(gated, num_warps=2), 1152)))
        bwd = configs["layernorm_modulate_bwd[bf16,CHUNK=128,PER_TOKEN=False,warps=8]"]
        print("grid:", aot.grid_problem(Launch(bwd, 1152, lambda B, N: B * -(-N // 64))))
        print("fine:", aot.launch_problems(Launch(bwd, 1152, lambda B, N: B * -(-N // 16))))
    """)
    result = subprocess.run([sys.executable, "-c", planted], capture_output=True, text=True,
                            env=env, timeout=600)
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert "56% of the lanes useful at width 1152" in lines.get("lanes", ""), result.stderr
    assert "narrow: [64" in lines.get("vectors", ""), result.stdout + result.stderr[-3000:]
    assert "spill stores" in lines.get("spills", ""), result.stdout + result.stderr[-3000:]
    assert "fewer than 2 x 132 SMs" in lines.get("grid", ""), result.stdout
    assert lines.get("fine") == "[]", result.stdout + result.stderr[-3000:]


NOT_BUILT = "libonestep_cuda.so was not built here (no nvcc at install time)"


def test_each_cuda_check_catches_a_launch_that_breaks_it():
    """The CUDA side of aot --memory-bound: a 256-thread tile at D = 1152 in bf16 (one vector
    each: 56% of the lanes useful), a backward of 64 rows per block (128 blocks at 8192 rows),
    and the one-element instantiations of the row kernels held to 128 bits (their accesses
    are 16-bit) each fail; the tiles the launchers pick pass."""
    from onestep_kernels import aot, native

    assert "56% of the lanes useful at width 1152" in aot.cuda_lanes_problem(1152, (256, 1, 8))
    assert aot.cuda_lanes_problem(1152, (32, 5, 8)) == ""
    assert "fewer than 2 x 132" in aot.cuda_grid_problem(lambda B, N: B * -(-N // 64))
    assert aot.cuda_grid_problem(lambda B, N: B * -(-N // 16)) == ""
    if not native.CUDA_LIBRARY_PATH.exists():
        pytest.skip(NOT_BUILT)
    assert aot.cuda_row_tile(384, 2, aot.CUDA_FWD_VECTORS) == (16, 3, 8)
    sass = aot._cuobjdump("-sass")
    assert not any(aot.cuda_sass_problems(sass).values())
    held = aot.cuda_sass_problems(sass, one_element_too=True)
    one_element = [name for name in held if re.search(aot.ONE_ELEMENT, name)]
    assert one_element and all("narrow: [16" in held[name] or "narrow: [32" in held[name]
                               for name in one_element), held


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
