"""Backend selection: precedence, availability report, and an import that needs no GPU and
no Triton."""

import subprocess
import sys
import textwrap

import pytest
import torch

import onestep_kernels as ok
from onestep_kernels import dispatch

CPU = torch.device("cpu")


def test_available_backends_reports_every_backend_with_a_reason():
    report = ok.available_backends()
    assert set(report) == {"triton", "cuda", "cpu", "torch"}
    assert report["torch"] == "available"
    assert report["cpu"] == "available", report["cpu"]
    if not torch.cuda.is_available():
        assert report["cuda"] != "available" and report["cuda"]


def test_default_on_cpu_is_the_native_kernel():
    assert dispatch.resolve(None, CPU) == "cpu"


def test_precedence_call_over_context_over_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve(None, CPU) == "torch"
    with ok.use_backend("triton"):
        assert dispatch.resolve(None, CPU) == "triton"
        with ok.use_backend("cpu"):
            assert dispatch.resolve(None, CPU) == "cpu"
        assert dispatch.resolve("torch", CPU) == "torch"
    assert dispatch.resolve(None, CPU) == "torch"


def test_bad_names_and_unusable_backends(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with ok.use_backend("gpu"):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="ONESTEP_BACKEND"):
        dispatch.resolve(None, CPU)
    with pytest.raises(ValueError, match="cuda"):
        dispatch.resolve("cuda", CPU)


def test_cannot_skips_in_default_and_refuses_when_asked():
    assert dispatch.resolve(None, CPU, {"cpu": "too wide"}) == "torch"
    with pytest.raises(ValueError, match="too wide"):
        dispatch.resolve("cpu", CPU, {"cpu": "too wide"})


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_import_without_triton_still_gives_cpu_and_torch():
    result = run_python("""
        import sys
        class BlockTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
        sys.meta_path.insert(0, BlockTriton())
        import torch, onestep_kernels as ok
        report = ok.available_backends()
        assert report["triton"] != "available", report
        assert report["cpu"] == "available", report
        x = torch.randn(2, 3, 8)
        out = ok.layernorm_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8))
        print("ok", report["triton"])
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_import_touches_no_gpu():
    result = run_python("""
        import torch, onestep_kernels
        assert not torch.cuda.is_initialized()
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
