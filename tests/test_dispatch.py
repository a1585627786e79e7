"""Backend selection: the records, the resolver's precedence and errors, the preference table,
the deprecated alias, the availability report, and an import that needs no GPU and no
Triton."""

import functools
import subprocess
import sys
import textwrap

import pytest
import torch

import onestep_kernels as ok
from onestep_kernels import dispatch, preferences
from onestep_kernels.dispatch import OPS

CPU = torch.device("cpu")
LN = "layernorm_modulate"


@pytest.fixture(autouse=True)
def resolver_as_without_a_gpu(monkeypatch):
    """These tests resolve calls on CPU tensors (nothing runs), with Triton taking CPU
    tensors through the interpreter as on the machines without a GPU (whether this machine's
    interpreter could run them or not)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "interpreter_problem", lambda: None)
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def resolve(backend=None, op=LN, dtype=torch.float32, width=64, needs_grad=False):
    return OPS[op].resolve(backend, CPU, dtype, width, needs_grad).name


def test_every_op_is_declared_with_a_pytorch_backend():
    assert set(OPS) >= {"layernorm_modulate", "gated_residual_layernorm_modulate",
                        "bias_gelu_tanh", "attention", "fused_linear"}
    for op in OPS.values():
        assert "reference" in op.backends, op.name
        assert op.torch_alias in op.backends, op.name
        for record in op.backends.values():
            assert record.is_expression or record.forward is not None, (op.name, record.name)
            for name in record.backward_from:
                assert op.backends[name].backward is not None, (op.name, record.name, name)


def test_available_backends_reports_every_backend_with_a_reason():
    report = ok.available_backends()
    assert set(report) == {"triton", "triton_padded", "cuda", "cpu", "reference", "sdpa",
                           "separate"}
    assert report["reference"] == "available"
    assert report["cpu"] == "available", report["cpu"]
    if not torch.cuda.is_available():
        assert report["cuda"] != "available" and report["cuda"]


def test_an_interpreter_that_cannot_run_is_reported_not_run(monkeypatch):
    """Triton's interpreter up to 3.6 fails on every kernel with a loop under NumPy 2.4
    (triton-lang/triton#9171): the triton backend says so, and the default skips it."""
    triton = pytest.importorskip("triton")
    import numpy

    from onestep_kernels import triton_compat

    for triton_version, numpy_version, broken in (("3.6.0", "2.4.6", True),
                                                  ("3.6.0", "2.3.5", False),
                                                  ("3.7.0", "2.4.0", False),
                                                  ("3.10.1", "2.10.0", False),
                                                  ("3.5.1+git1", "2.4.0rc1", True)):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        problem = triton_compat.interpreter_problem()
        assert (problem is not None) == broken, (triton_version, numpy_version)
    monkeypatch.setattr(dispatch, "interpreter_problem", triton_compat.interpreter_problem)
    dispatch.clear_cache()
    assert "triton-lang/triton#9171" in ok.available_backends()["triton"]
    with pytest.raises(ValueError, match="9171"):
        resolve("triton")
    assert resolve() == "cpu"


def test_backend_choices_name_the_choice_and_every_reason():
    report = ok.backend_choices("cpu", torch.bfloat16)
    assert report[LN]["chosen"] == "cpu"
    assert report["attention"]["chosen"] == "sdpa"
    assert report["fused_linear"]["chosen"] == "separate"
    assert set(report[LN]["backends"]) == set(OPS[LN].backends)
    assert report[LN]["backends"]["reference"] == "can run"


def test_default_on_cpu_follows_the_default_order():
    assert resolve() == "cpu"
    assert OPS[LN].order(CPU)[0] == "cpu"
    assert resolve(dtype=torch.float64) == "reference"  # float64 runs the reference


def test_gpu_rows_fall_back_to_sm90(monkeypatch):
    monkeypatch.setattr(preferences, "device_class", lambda device: "sm_120")
    monkeypatch.setattr(preferences, "device_key", lambda device: "sm_120|a future GPU")
    gpu = torch.device("cuda", 0)
    assert OPS["attention"].order(gpu) == OPS["attention"].default_order["sm_90"]
    assert OPS["attention"].default_order["sm_90"][0] == "sdpa"
    assert OPS["fused_linear"].default_order["sm_90"][0] == "separate"


def test_a_measured_order_takes_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ONESTEP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ONESTEP_PREFERENCES")
    (tmp_path / "preferences.json").write_text(
        '{"%s": {"order": {"layernorm_modulate": ["reference", "cpu"]}}}'
        % preferences.device_key(CPU))
    dispatch.clear_cache()
    try:
        assert resolve() == "reference"
    finally:
        dispatch.clear_cache()


def test_precedence_call_over_context_over_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert resolve() == "reference"
    with ok.use_backend("triton"):
        assert resolve() == "triton"
        with ok.use_backend("cpu"):
            assert resolve() == "cpu"
        assert resolve("reference") == "reference"
    assert resolve() == "reference"


def test_a_context_choice_leaves_ops_without_that_backend_alone():
    with ok.use_backend("sdpa"):
        assert resolve(op="attention", width=72) == "sdpa"
        assert resolve() == "cpu"


def test_bad_names_and_unusable_backends(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with ok.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match="backend: layernorm_modulate has no backend 'sdpa'"):
        resolve("sdpa")
    monkeypatch.setenv(dispatch.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="ONESTEP_BACKEND"):
        resolve()
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(ValueError, match="cuda"):
        resolve("cuda")


def test_a_refused_request_names_its_reason_and_the_default_skips_it():
    with pytest.raises(ValueError, match=r"'triton_padded' cannot run layernorm_modulate here: "
                                         r"takes D"):
        resolve("triton_padded", width=5000)
    assert resolve(width=5000) == "cpu"
    with pytest.raises(ValueError, match="forward only"):
        resolve("triton", op="fused_linear", needs_grad=True)
    assert resolve(op="fused_linear", needs_grad=True) == "separate"


def test_nothing_fits_lists_every_backends_reason(monkeypatch):
    op = OPS[LN]
    monkeypatch.setattr(op, "backends", {n: b for n, b in op.backends.items()
                                         if n != "reference"})
    monkeypatch.setattr(op, "_cache", {})
    with pytest.raises(RuntimeError) as error:  # every op has a PyTorch backend: a bug
        op.resolve(None, CPU, torch.float64, 64, False)
    message = str(error.value)
    assert not isinstance(error.value, ValueError)  # not the user's error
    assert message.startswith("layernorm_modulate: no backend can run this call")
    for name in ("triton", "cuda", "cpu"):
        assert f"{name}: " in message, message


def test_torch_is_a_deprecated_alias():
    dispatch.clear_cache()
    with pytest.warns(DeprecationWarning, match="'torch' is deprecated"):
        assert resolve("torch") == "reference"
    with pytest.warns(DeprecationWarning):
        assert resolve("torch", op="attention", width=72) == "sdpa"
    with pytest.warns(DeprecationWarning):
        assert resolve("torch", op="fused_linear") == "separate"


def test_a_record_claims_only_what_it_runs(monkeypatch):
    """Every (backend, dtype) a record accepts on this machine computes the op: the forward
    of each op on tiny inputs, against the reference backend."""
    from onestep_kernels import triton_compat

    monkeypatch.setattr(dispatch, "interpreter_problem", triton_compat.interpreter_problem)
    dispatch.clear_cache()  # (this test runs the kernels: this machine's interpreter decides)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    mods = [torch.randn(2, 32, generator=g) for _ in range(3)]
    q = torch.randn(1, 2, 3, 16, generator=g)
    calls = {
        LN: (lambda b, d: ok.layernorm_modulate(x.to(d), mods[0].to(d), mods[1].to(d),
                                                backend=b), 32),
        "gated_residual_layernorm_modulate": (lambda b, d: ok.gated_residual_layernorm_modulate(
            x.to(d), y.to(d), *(m.to(d) for m in mods), backend=b)[1], 32),
        "bias_gelu_tanh": (lambda b, d: ok.bias_gelu_tanh(x.to(d), mods[0][0].to(d),
                                                          backend=b), 32),
        "attention": (lambda b, d: ok.attention(q.to(d), q.to(d), q.to(d), backend=b), 16),
        "fused_linear": (lambda b, d: ok.fused_linear(x.to(d), y[0].to(d), backend=b), 32),
    }
    checked = 0
    for name, (call, width) in calls.items():
        for record in OPS[name].backends.values():
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                if record.reason(CPU, dtype, width, False) is not None:
                    with pytest.raises(ValueError):
                        call(record.name, dtype)
                    continue
                with torch.no_grad():
                    out, ref = call(record.name, dtype), call("reference", dtype)
                assert out.dtype == ref.dtype, (name, record.name, dtype)
                torch.testing.assert_close(out.double(), ref.double(), rtol=2e-2, atol=2e-2)
                checked += 1
    assert checked >= 20


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_import_without_triton_still_gives_cpu_and_reference():
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


# ---- a backend that borrows its backward -----------------------------------------------------

GATED = "gated_residual_layernorm_modulate"


def test_a_borrowed_backward_asks_the_donor_about_the_whole_call(monkeypatch):
    """A forward-only backend that borrows the padded Triton backward, whose rows stop at
    GATED_MAX_D: at wider rows (Flux's 3072) the backward must be the next donor's (here the
    chunked Triton one), not a Triton kernel at a tile that spills. The choice is cached per
    width and dtype."""
    import dataclasses

    from onestep_kernels.ops import gated_residual_layernorm_modulate as gated
    from onestep_kernels.ops import padded_rows

    op, gpu = OPS[GATED], torch.device("cuda", 0)  # (only resolved: nothing runs)
    monkeypatch.setitem(op.backends, "cuda", dataclasses.replace(
        op["cuda"], backward=None, backward_from=("triton_padded", "triton")))
    monkeypatch.setattr(op, "_backward_cache", {})
    # as on a GPU with the CUDA library built (only resolved: nothing runs)
    monkeypatch.setattr(dispatch, "_runtime_reason", functools.cache(lambda runtime: None))
    assert padded_rows.GATED_MAX_D < 3072
    for width, dtype, expected in ((1152, torch.bfloat16, padded_rows.gated_bwd),
                                   (3072, torch.bfloat16, gated._triton_bwd),
                                   (1152, torch.bfloat16, padded_rows.gated_bwd),
                                   (3072, torch.float16, gated._triton_bwd)):
        assert op.backward_launcher(op["cuda"], gpu, dtype, width) is expected, (width, dtype)
    assert op.reason("triton_padded", gpu, torch.bfloat16, 3072, True) is not None


def test_a_borrower_whose_donors_all_refuse_cannot_take_a_call_with_gradients(monkeypatch):
    import dataclasses

    op = OPS[GATED]
    narrow = dataclasses.replace(op["triton"], max_width=64)
    monkeypatch.setitem(op.backends, "triton", narrow)
    monkeypatch.setitem(op.backends, "cuda", dataclasses.replace(
        op["cuda"], backward=None, backward_from=("triton",)))
    monkeypatch.setattr(op, "_cache", {})
    monkeypatch.setattr(op, "_backward_cache", {})
    gpu = torch.device("cuda", 0)
    # as on a GPU with the CUDA library built (only resolved: nothing runs)
    monkeypatch.setattr(dispatch, "_runtime_reason", functools.cache(lambda runtime: None))
    reason = op.reason("cuda", gpu, torch.float16, 128, True)
    assert reason is not None and "triton: takes D in 1..64" in reason, reason
    assert op.reason("cuda", gpu, torch.float16, 128, False) is None  # no gradient: fine
    assert op.reason("cuda", gpu, torch.float16, 64, True) is None
    with pytest.raises(RuntimeError, match="no backend it borrows a backward from"):
        op.backward_launcher(op["cuda"], gpu, torch.float16, 128)


def test_the_interpreter_refuses_bfloat16():
    for op in OPS.values():
        if "triton" in op.backends:
            reason = op.reason("triton", CPU, torch.bfloat16, 64, False)
            assert reason == "the Triton interpreter computes bfloat16 wrongly", op.name
