"""The one-command GPU pass: without CUDA it says so and exits 0; its plumbing (rows, records,
targets, JSON that merges across calls, the markdown table) runs on the CPU with --smoke."""

import json

import pytest
import torch

import onestep_gpu_check as gpu_check


def test_without_cuda_it_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_unknown_row_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path), "--only", "ceilings,nonsense"])
    assert exit_info.value.code == 2


def test_smoke_pass_writes_rows_that_merge(tmp_path, monkeypatch):
    out = tmp_path / "results"
    rows = ["ceilings", "block", "dit", "profile", "memory_bound", "attention", "host"]
    assert gpu_check.main(["--out", str(out), "--smoke", "--only", ",".join(rows)]) == 0
    assert gpu_check.main(["--out", str(out), "--smoke", "--only",
                           "fused_linear,slt,screening,diffusers"]) == 0
    results = json.loads((out / "gpu_check.json").read_text())
    assert set(results["rows"]) == {*rows, "fused_linear", "slt", "screening", "diffusers"}
    for name, row in results["rows"].items():
        assert row["error"] is None, (name, row["error"])
        assert row["records"], name
        for record in row["records"]:
            assert "error" not in record, (name, record)
    ceilings = results["ceilings"]
    assert ceilings["GB/s"] > 0 and ceilings["GFLOP/s"] > 0
    block = results["rows"]["block"]
    contenders = {(r["case"], r["contender"]) for r in block["records"]}
    assert ("B=2 forward", "onestep") in contenders and ("B=2 forward", "roofline") in contenders
    targets = {t["target"]: t for t in block["targets"]}
    measured = targets["block fwd B=2: speed-up over eager >= 1.25"]
    assert measured["value"] > 0 and isinstance(measured["met"], bool)
    if abs(measured["value"] - 1.25) > 1e-3:  # (the record rounds the value to 3 digits)
        assert measured["met"] is (measured["value"] >= 1.25)
    assert targets["block fwd B=2: speed-up over torch.compile >= 1.05"]["met"] is None
    profile = {(r["case"], r["contender"]): r for r in results["rows"]["profile"]["records"]}
    assert set(profile) == {(f"B=2 {case}", name) for case in ("forward", "forward+backward")
                            for name in ("eager", "onestep")}
    assert all(r["busy_ms"] > 0 and len(r["longest"]) == 5 for r in profile.values())
    assert "onestep block, B=2 forward+backward" in (out / "profile.txt").read_text()
    slt = {(r["case"].split(", ")[-1], r["contender"]) for r in results["rows"]["slt"]["records"]}
    assert {("2 x 64 tokens forward", "onestep"), ("2 x 64 tokens forward", "eager loop"),
            ("2 x 64 tokens depth loop", "one application"),  # and the digits size:
            ("2 x 16 tokens forward", "onestep"), ("2 x 16 tokens forward+backward", "onestep"),
            ("2 x 16 tokens forward", "floor (products + attention)"),
            ("2 x 16 tokens forward", "floor's products chained")} <= slt, slt
    targets = [t["target"] for t in results["rows"]["slt"]["targets"]]
    assert len(targets) == 10 and sum("slt-tiny K=8, 2 x 16 tokens" in t for t in targets) == 5
    screening = {t["target"].split(": ")[-1]: t for t in results["rows"]["screening"]["targets"]}
    assert screening["FLOPs(screen) / FLOPs(teacher sample) <= 1.0"]["met"] is True
    # (a ratio of two latencies of tiny networks: its size means nothing in a smoke pass, and a
    # busy machine has timed the teacher alone slower than screening + teacher)
    assert screening["time(screen + teacher) / time(teacher) <= 2.2"]["value"] > 0
    assert len(screening) == 3
    table = (out / "gpu_check.md").read_text()
    assert "## memory_bound" in table and "## fused_linear" in table
    assert "layernorm_modulate fwd | cpu |" in table


def test_a_target_is_met_by_a_value_on_the_right_side_of_its_bound():
    row = gpu_check.Row("block", gpu_check.smoke_setting(), {})
    row.target("fast", 1.3, 1.25)
    row.target("slow", 1.2, 1.25)
    row.target("small", 0.9, 1.0, at_least=False)
    row.target("large", 1.1, 1.0, at_least=False)
    row.target("absent", None, 1.0)
    assert [t["met"] for t in row.targets] == [True, False, True, False, None]


def test_a_failing_row_is_recorded_and_the_pass_goes_on(tmp_path, monkeypatch):
    def broken(row):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.ROWS, "host", broken)
    assert gpu_check.main(["--out", str(tmp_path), "--smoke", "--only", "host,ceilings"]) == 1
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "boom" in results["rows"]["host"]["error"]
    assert results["rows"]["ceilings"]["error"] is None


def test_a_failing_contender_records_where_its_root_cause_was_raised():
    """An inductor failure arrives as BackendCompilerFailed around an AssertionError with no
    message: the record keeps the place it was raised."""
    from onestep_gpu_check import describe_error

    def lowering():
        raise AssertionError  # as inductor's bare asserts arrive (no message)

    try:
        try:
            lowering()
        except AssertionError as inner:
            raise RuntimeError("backend='inductor' raised:\nAssertionError:") from inner
    except RuntimeError as err:
        record = describe_error(err)
    assert record["error"] == "RuntimeError: backend='inductor' raised:"
    assert record["root_cause"] == "AssertionError"
    assert "lowering: raise AssertionError" in record["raised_at"][-1]
    assert describe_error(AssertionError())["error"] == "AssertionError"


def test_both_timings_measure_a_call_of_known_length():
    """On the CPU both are wall-clock times per call: a call that sleeps 2 ms reads ~2 ms either
    way (queued: over groups of back-to-back calls; alone: one call at a time)."""
    import time

    from onestep_kernels import timing

    calls = []

    def two_ms():
        calls.append(None)
        time.sleep(0.002)

    cpu = torch.device("cpu")
    for measure in (timing.queued, timing.alone):
        calls.clear()
        seconds = measure(two_ms, cpu, target_s=0.05)
        assert 0.0019 < seconds < 0.004, (measure.__name__, seconds)
        assert 5 <= len(calls) <= 200, (measure.__name__, len(calls))


def test_autotune_row_reports_each_option_and_the_choice(monkeypatch):
    """The autotune row reads what Triton's autotuner kept (its options' times at the last shape
    it tuned, its choice per key) for every kernel onestep launched; kernels that were not
    autotuned are left out. Plumbing on the CPU with a stand-in autotuner."""
    from types import SimpleNamespace

    from onestep_kernels import tuning

    class Config:  # hashed by identity, as triton.Config is
        def __init__(self, prefetch, warps):
            self.kwargs, self.num_warps = {"PREFETCH": prefetch}, warps

    slow, fast = Config(False, 8), Config(True, 8)
    tuner = SimpleNamespace(configs_timings={slow: [0.20, 0.19, 0.21], fast: [0.15, 0.14, 0.16]},
                            cache={("D=1152",): fast})
    def _bwd_kernel():  # stand-ins for the JIT functions (named by their __name__)
        pass

    def _fwd_kernel():
        pass

    monkeypatch.setattr(tuning, "_SELECTED", {
        (_bwd_kernel, (), ("D",)): (tuner, {}),
        (_fwd_kernel, (8,), ("D",)): (_fwd_kernel, {"num_warps": 8})})
    row = gpu_check.Row("autotune", gpu_check.smoke_setting(), {})
    gpu_check.rows.row_autotune(row)
    assert row.records == [
        {"case": "autotune _bwd_kernel", "contender": "PREFETCH=False,warps=8", "ms": 0.2,
         "chosen": False},
        {"case": "autotune _bwd_kernel", "contender": "PREFETCH=True,warps=8", "ms": 0.15,
         "chosen": True},
    ]


@pytest.mark.slow
def test_tests_row_reports_a_whole_run_and_a_run_its_budget_cut(tmp_path):
    """The tests row's pytest run (in smoke mode, tests/test_cuda_graph.py on the CPU): a whole
    run passes; one whose deadline comes before its first test skips every test with the
    budget's reason and ends by itself, its report saying that nothing failed but not all ran."""
    import time

    row = gpu_check.Row("tests", gpu_check.smoke_setting(), {})
    row.out = tmp_path
    gpu_check.suite.row_tests(row)
    whole = row.records[-1]
    assert whole["exit_code"] == 0 and whole["tests"] > 0 and whole["failures"] == 0
    assert whole["cut"] == 0 and row.targets[-1]["met"] is True

    row.deadline = time.perf_counter() + 30.5  # its tests' deadline: half a second from now
    gpu_check.suite.row_tests(row)
    cut = row.records[-1]
    assert cut["exit_code"] == 0 and cut["tests"] == cut["skipped"] == whole["tests"]
    assert cut["cut"] == whole["tests"] - whole["skipped"]  # the rest skip for want of a GPU
    assert row.targets[-1]["met"] is None  # not measured: no test ran


def test_tests_row_runs_every_test_file_once_the_gpu_ones_first():
    from pathlib import Path

    files = gpu_check.ordered_test_files()
    every = sorted(str(p.relative_to(gpu_check.suite.REPO))
                   for p in (gpu_check.suite.REPO / "tests").rglob("test_*.py"))
    assert sorted(files) == every and len(set(files)) == len(files)
    gpu_ones = [f for f in files if any(f == name or f.startswith(name + "/")
                                        for name in gpu_check.GPU_TESTS_FIRST)]
    assert files[:len(gpu_ones)] == gpu_ones and Path(files[0]).parent.name == "ops"
