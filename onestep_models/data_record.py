"""What a run trains on, recorded once in its directory and compared when it resumes.

A fingerprint is JSON: {"kind": ..., "settings": {...}, "files": {name: sha256}}, what the
tensors were made from and by which settings:

- digits: settings {"size"}; files {"sklearn:digits": the sha256 of scikit-learn's images and
  labels as loaded}.
- folder: settings {"size", "channels", "skip_bad_images", "vae": the sha256 of the VAE's files
  or None}; files: every image read (its path under --data) and the sha256 of the bytes that
  were decoded (no second read; a change that keeps the modification time shows).
- pairs: settings: the manifest (pairs.json: count, shape, shard size, solver, seed, teacher);
  files: every shard file's sha256 as written into its shard.json (which loading verifies
  against the file).
- noise (data-free distillation): settings: the data entry of the run; no files (the noise is
  drawn per step from the run's seed).

`record_data` writes RUN/data.json at a run's first start, and on resume compares: data that
changed is refused (DataChanged, exit 2) with one line saying which settings and files, unless
allowed, which logs the change. A run made before fingerprints has no data.json: it is
accepted with a warning and fingerprinted then.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from torch.utils.data import TensorDataset

from onestep_kernels.errors import DataError

DATA_RECORD = "data.json"

# the argument that names each kind of data on the command line
ARGUMENT = {"digits": "--data", "folder": "--data", "pairs": "--pairs", "noise": "--teacher"}


class DataChanged(DataError):
    """Resuming on data other than the data the run recorded, without allow_data_change."""


class RecordedDataset(TensorDataset):
    """A TensorDataset that carries the fingerprint of what it was made from."""

    def __init__(self, *tensors, fingerprint: dict[str, Any]):
        super().__init__(*tensors)
        self.fingerprint = fingerprint


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """One sha256 for a whole fingerprint (its canonical JSON)."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown
                                       else "")


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed from `recorded` to `current`, one phrase per setting and per kind of file
    change (changed, added, removed), the first few files named."""
    if recorded.get("kind") != current.get("kind"):
        return [f"kind: {recorded.get('kind')!r} -> {current.get('kind')!r}"]
    changes = []
    old, new = recorded.get("settings", {}), current.get("settings", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    old, new = recorded.get("files", {}), current.get("files", {})
    changed = sorted(name for name in set(old) & set(new) if old[name] != new[name])
    for what, names in (("changed", changed), ("added", sorted(set(new) - set(old))),
                        ("removed", sorted(set(old) - set(new)))):
        if names:
            plural = "s" if len(names) > 1 else ""
            changes.append(f"{len(names)} file{plural} {what}: {_names(names)}")
    return changes


def read_record(directory: Path) -> dict[str, Any] | None:
    """RUN/data.json, or None when the run has none."""
    path = Path(directory) / DATA_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is damaged ({err}); remove it to fingerprint the data "
                        "again") from None


def record_data(directory: Path, fingerprint: dict[str, Any], *, resuming: bool,
                allow_change: bool = False, writer: bool = True) -> list[str]:
    """Record `fingerprint` as the run's data in `directory`, or, `resuming`, compare it with
    the recorded one: a change raises DataChanged naming what changed, unless `allow_change`
    (then the new data is recorded). Returns the changes allowed. Only the `writer` (rank 0)
    writes; every process compares, so that all of them stop alike."""
    from onestep_models.run_dir import write_json_atomic

    directory = Path(directory)
    fingerprint = json.loads(json.dumps(fingerprint))  # (as it reads back: tuples are lists)
    recorded = read_record(directory) if resuming else None
    if resuming and recorded is None and writer:
        print(f"onestep: {directory} has no {DATA_RECORD} (made before data fingerprints): "
              "its data is fingerprinted now", file=sys.stderr)
    changes = differences(recorded, fingerprint) if recorded is not None else []
    if changes and not allow_change:
        argument = ARGUMENT.get(fingerprint.get("kind"), "--data")
        raise DataChanged(
            f"{argument}: the data differs from what the run in {directory} trained on "
            f"({'; '.join(changes)}); resume with that data, pass --allow-data-change to go on "
            "with this data, or use a new --out")
    if writer and (recorded is None or changes):
        write_json_atomic(directory / DATA_RECORD, fingerprint)
    return changes
