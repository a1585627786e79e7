"""`python -m onestep_kernels.measure` on this machine's CPU: it times every backend that can
run each op's example call, stores the order per device, and the resolver then follows it; a
backend that fails is reported and left out of the order, not the end of the measurement."""

import json

import pytest
import torch

import onestep_gpu_check as gpu_check
from onestep_kernels import dispatch, measure, preferences
from onestep_kernels.dispatch import OPS

CPU = torch.device("cpu")


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """A preference cache of the test's own, read (not ignored), with the backends a CPU
    machine has when TRITON_INTERPRET is not set (a user's measurement)."""
    monkeypatch.setenv("ONESTEP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ONESTEP_PREFERENCES", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch.clear_cache()
    yield tmp_path / "preferences.json"
    dispatch.clear_cache()


def test_measure_stores_an_order_the_resolver_follows(own_cache, capsys):
    assert measure.main(["--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    entry = json.loads(own_cache.read_text())[preferences.device_key(CPU)]
    assert set(entry["order"]) == set(OPS) and "failed" not in entry, entry.get("failed")
    assert entry["dtype"] == "torch.float32" and entry["torch"] == torch.__version__
    for op, order in entry["order"].items():
        seconds = entry["seconds"][op]
        assert order == sorted(seconds, key=seconds.get) and all(s > 0 for s in seconds.values())
        runnable = {name for name, reason in OPS[op].reasons(CPU, torch.float32, 384, False)
                    .items() if reason is None}
        assert set(order) == runnable, op
        assert f"{op}: {order[0]} " in printed
        assert OPS[op].order(CPU) == tuple(order)
        width = 64 if OPS[op].width_name == "head dim" else 384
        assert OPS[op].resolve(None, CPU, torch.float32, width, False).name == order[0]
    assert measure.main(["--device", "cpu", "--show"]) == 0  # the order in use
    assert f"attention: {', '.join(entry['order']['attention'])}" in capsys.readouterr().out


def test_a_backend_that_fails_is_reported_and_left_out(own_cache, monkeypatch):
    calls = {"layernorm_modulate": lambda backend: ok_or_fail(backend)}

    def ok_or_fail(backend):
        if backend in ("triton", "triton_padded", "cuda"):  # as the resolver refuses it
            raise ValueError(f"backend: backend {backend!r} cannot run layernorm_modulate here")
        if backend == "reference":
            raise RuntimeError("a kernel crashed\nmore lines")
        return torch.zeros(1)

    monkeypatch.setattr(measure, "example_calls", lambda device: calls)
    row = gpu_check.Row("preferences", gpu_check.smoke_setting(), {})
    gpu_check.rows.row_preferences(row)
    entry = json.loads(own_cache.read_text())[preferences.device_key(CPU)]
    assert entry["order"]["layernorm_modulate"] == ["cpu"]
    assert entry["failed"] == {"layernorm_modulate": {
        "reference": "RuntimeError: a kernel crashed"}}
    assert {r["contender"]: "error" in r for r in row.records} == {"cpu": False,
                                                                   "reference": True}


def test_a_new_order_takes_effect_in_the_same_process(own_cache, monkeypatch):
    """Calls made while measuring resolve ops themselves (fused_linear's "separate" runs
    layernorm_modulate on its default): those resolutions, made under the old order, must not
    outlive the new one."""
    op = OPS["layernorm_modulate"]

    def call(backend):
        if backend not in ("cpu", "reference"):
            raise ValueError(f"backend: backend {backend!r} cannot run layernorm_modulate here")
        assert op.resolve(None, CPU, torch.float32, 16, False).name == "cpu"  # the table's
        return backend

    monkeypatch.setattr(measure, "example_calls", lambda device: {"layernorm_modulate": call})
    monkeypatch.setattr(measure, "_time",  # the reference measures faster here
                        lambda fn, device: {"cpu": 2e-3, "reference": 1e-3}[fn()])
    measure.measure_and_store(CPU)
    assert OPS["layernorm_modulate"].order(CPU) == ("reference", "cpu")
    assert op.resolve(None, CPU, torch.float32, 16, False).name == "reference"
