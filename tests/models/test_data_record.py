"""The data a run trains on is recorded in RUN/data.json and compared when the run resumes
(issue 29, item 1): a changed image folder or pairs folder is refused in one line naming what
changed, unless --allow-data-change, which logs it; runs from before fingerprints are
fingerprinted once. On the parent commit each resume below trained on, exit 0, no word."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from onestep_models import cli, slimflow
from onestep_models.data_record import DATA_RECORD, differences, record_data


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_differences_name_each_setting_and_the_files():
    old = {"kind": "pairs", "settings": {"num": 16, "seed": 1},
           "files": {f"f{i}": "a" for i in range(6)}}
    new = {"kind": "pairs", "settings": {"num": 8, "seed": 1},
           "files": {**{f"f{i}": "b" for i in range(5)}, "g": "c"}}
    assert differences(old, new) == [
        "num: 16 -> 8", "5 files changed: f0, f1, f2, ... (5 in all)", "1 file added: g",
        "1 file removed: f5"]
    assert differences(old, old) == []
    assert differences(old, {**old, "kind": "folder"}) == ["kind: 'pairs' -> 'folder'"]


def test_a_damaged_record_is_named(tmp_path):
    (tmp_path / DATA_RECORD).write_text("{not json")
    with pytest.raises(ValueError, match=f"^{tmp_path / DATA_RECORD} is damaged"):
        record_data(tmp_path, {"kind": "digits", "settings": {}, "files": {}}, resuming=True)


def _folder(root, count=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _replace_keeping_mtime(path, source):
    """Another image's bytes under this name, the modification time as it was."""
    stat = path.stat()
    path.write_bytes(source.read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_changed_image_folder_is_refused_on_resume_unless_allowed(tmp_path, capsys):
    root, out = _folder(tmp_path / "data"), tmp_path / "run"
    args = ["train", "direct", "--data", root, "--size", "8", "--out", out, "--batch-size",
            "4", "--no-progress", "--checkpoint-every", "1"]
    code, _, err = run(capsys, *args, "--steps", "1")
    assert code == 0, err
    recorded = json.loads((out / DATA_RECORD).read_text())
    assert recorded["kind"] == "folder" and sorted(recorded["files"]) == [
        "cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png"]
    _replace_keeping_mtime(root / "dog" / "1.png", root / "cat" / "0.png")
    code, _, err = run(capsys, *args, "--steps", "2")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"onestep: error: --data: the data differs from what the run in {out}"
                          " trained on (1 file changed: dog/1.png)")
    assert "--allow-data-change" in err
    shutil.copy(root / "cat" / "0.png", root / "cat" / "3.png")
    code, _, err = run(capsys, *args, "--steps", "2")
    assert code == 2 and "1 file changed: dog/1.png; 1 file added: cat/3.png" in err
    # allowed: trained on, the change logged and recorded
    code, _, err = run(capsys, *args, "--steps", "2", "--allow-data-change")
    assert code == 0, err
    assert "resuming step 1 on changed data: 1 file changed: dog/1.png" in err
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["changes"] for e in events if e.get("event") == "data_change"] == [
        ["1 file changed: dog/1.png", "1 file added: cat/3.png"]]
    assert "cat/3.png" in json.loads((out / DATA_RECORD).read_text())["files"]
    code, _, err = run(capsys, *args, "--steps", "3")  # the new data is the run's now
    assert code == 0 and "changed data" not in err, err


def _pairs(out, num, heun_steps):
    from onestep_models.dit import FlowDiT

    torch.manual_seed(0)
    teacher = FlowDiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1,
                      num_heads=2, num_classes=10, class_dropout_prob=0.0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.05)
    shutil.rmtree(out, ignore_errors=True)
    slimflow.generate_pairs(teacher, out, num=num, shape=(1, 8, 8), num_classes=10,
                            shard_size=8, heun_steps=heun_steps, seed=1,
                            settings={"data": {"kind": "digits", "size": 8}})


def test_pairs_replaced_by_another_set_are_refused_on_resume(tmp_path, capsys):
    """The issue's case: a SlimFlow run on --pairs P, P replaced by another set (fewer pairs,
    other Heun steps), the run resumed: two pair sets mixed, on the parent commit. (The same
    seed draws the same noise and labels: only x1 differs in the first shard.)"""
    pairs, out = tmp_path / "pairs", tmp_path / "run"
    _pairs(pairs, 16, 2)
    args = ["train", "slimflow", "--pairs", pairs, "--out", out, "--stage", "reflow",
            "--batch-size", "4", "--no-progress", "--checkpoint-every", "1"]
    code, _, err = run(capsys, *args, "--steps", "1")
    assert code == 0, err
    _pairs(pairs, 8, 3)
    code, _, err = run(capsys, *args, "--steps", "2")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("onestep: error: --pairs: the data differs from what the run in "
                          f"{out / 'reflow'} trained on (heun_steps: 2 -> 3; num: 16 -> 8; "
                          "1 file changed: shard_00000/x1.npy; 3 files removed: "
                          "shard_00001/x1.npy, shard_00001/y.npy, shard_00001/z0.npy)"), err


def test_a_run_from_before_fingerprints_is_fingerprinted_once(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "direct", "--out", out, "--batch-size", "4", "--no-progress",
            "--checkpoint-every", "1"]
    code, _, err = run(capsys, *args, "--steps", "1")
    assert code == 0, err
    recorded = json.loads((out / DATA_RECORD).read_text())
    assert recorded["kind"] == "digits" and list(recorded["files"]) == ["sklearn:digits"]
    (out / DATA_RECORD).unlink()  # as a run made before this change
    code, _, err = run(capsys, *args, "--steps", "2")
    assert code == 0 and "has no data.json (made before data fingerprints)" in err, err
    assert json.loads((out / DATA_RECORD).read_text()) == recorded
    code, _, err = run(capsys, *args, "--steps", "3")
    assert code == 0 and "data.json" not in err, err
