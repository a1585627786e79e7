"""torch.compile's on-disk caches and onestep's ops (onestep_kernels/compile_cache.py): a
change to the ops' sources changes the cache key tag, so no graph compiled with other autograd
formulas is reused (pytorch/pytorch#144344). The tag is set when an op is first traced, from
the registered ops' fakes, not when the package is imported."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from onestep_kernels import compile_cache


def run_python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=600, env=env)


def test_importing_changes_no_setting_and_the_first_trace_tags_the_caches():
    done = run_python("""
        import torch
        before = torch.compiler.config.cache_key_tag
        import onestep_kernels as ok
        from onestep_kernels import compile_cache
        assert torch.compiler.config.cache_key_tag == before, "import changed the tag"
        x, s = torch.randn(2, 3, 8), torch.randn(2, 8)
        torch.compile(lambda x, s: ok.layernorm_modulate(x, s, s, backend="cpu"),
                      fullgraph=True)(x, s)
        assert f"onestep-{compile_cache.source_digest()}" in \\
            torch.compiler.config.cache_key_tag.split("+"), torch.compiler.config.cache_key_tag
        print("ok")
    """, env={k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_CACHE_KEY_TAG"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_the_digest_follows_the_sources_and_a_users_tag_is_kept(tmp_path):
    (tmp_path / "op.py").write_text("GRAD_SCALE = 1.0\n")
    first = compile_cache.source_digest([tmp_path])
    (tmp_path / "op.py").write_text("GRAD_SCALE = 2.0\n")
    assert compile_cache.source_digest([tmp_path]) != first
    assert compile_cache.source_digest() != compile_cache.source_digest(
        [compile_cache.PACKAGE_DIR / "ops"])  # op_spec.py, which builds the formulas, counts
    # (the config's own patch: pytest's monkeypatch would delete the setting on undo, which
    # hides it from every later compile)
    with torch.compiler.config.patch(cache_key_tag="mine"):
        tag = compile_cache.tag_compile_caches([tmp_path])
        assert tag == f"mine+onestep-{compile_cache.source_digest([tmp_path])}"
        assert compile_cache.tag_compile_caches([tmp_path]) == tag  # once


# A custom op whose backward formula is the only thing that differs between two runs sharing
# one inductor cache; the tag is set from its fake, as onestep's ops do (when the op is first
# traced). With it the second run compiles afresh and gets its own gradient.
SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from onestep_kernels.compile_cache import tag_compile_caches

    ops_dir = Path(sys.argv[1])
    scale = float((ops_dir / "op.py").read_text().split("=")[1])

    @torch.library.custom_op("cachetest::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def fake(x):
        if sys.argv[2] == "tag":
            tag_compile_caches([ops_dir])
        return torch.empty_like(x)

    double.register_fake(fake)
    double.register_autograd(lambda ctx, grad: grad * scale)

    x = torch.ones(3, requires_grad=True)
    torch.compile(lambda t: double(t).sum())(x).backward()
    print(x.grad[0].item())
""")


@pytest.mark.slow
def test_a_changed_backward_formula_is_not_served_from_the_cache(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ops_dir = tmp_path / "ops"
    ops_dir.mkdir()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)

    def grad(scale: float, mode: str) -> float:
        (ops_dir / "op.py").write_text(f"SCALE = {scale}\n")
        done = subprocess.run([sys.executable, str(script), str(ops_dir), mode], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.split()[-1])

    assert grad(1.0, "notag") == 1.0
    assert grad(3.0, "notag") == 1.0  # the hazard: the old formula's graph, from the cache
    assert grad(3.0, "tag") == 3.0
    assert grad(5.0, "tag") == 5.0  # a new digest, set while tracing: compiled afresh
