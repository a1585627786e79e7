"""A run directory that survives faults: one writer at a time, checkpoints that are whole,
finite and verified, and a log that agrees with the newest checkpoint.

    RUN/
      .lock                      held (fcntl) by the one process writing the run; its pid inside
      log.jsonl                  strict JSON, one line per logged step
      checkpoints/step_<8 digits>/
        model.safetensors  ema.safetensors  optimizer.pt
        state.json               step, run config, seconds trained, and a manifest: each
                                 file's size and sha256, verified before anything is loaded

A checkpoint is written into `checkpoints/.tmp_step_*` and renamed, so a crash leaves whole
checkpoints only; one holding a non-finite tensor is never written; rotation keeps the newest
`keep`. Loading verifies the manifest and the tensors (finite, and the shapes of the model they
go into); a damaged file is a `CheckpointError` naming the file and what is wrong, and
`latest_checkpoint` skips damaged checkpoints for the newest intact one, saying which.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor, nn

from onestep_kernels.errors import DataError, MachineError, RunStopped, UserError

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt")


class CheckpointError(DataError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


class NonFiniteError(RunStopped):
    """A non-finite value where only finite ones may go (a loss, a gradient, a checkpoint):
    the run stops (the command line's exit code 1)."""

    exit_code = 1


class RunLocked(UserError):
    """Another process is writing the run directory (the user's second command)."""


# ---------------------------------------------------------------------------- one writer

class RunLock:
    """An exclusive fcntl lock on RUN/.lock for the life of a run; the holder's pid is written
    in the file so that a second writer can be told who holds it. The kernel drops the lock
    when the process dies, so a crashed run never leaves the directory locked."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self._file = None

    def acquire(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunLocked(f"--out: {self.path.parent} is being written by another run "
                            f"(pid {holder}); wait for it or use another directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(directory: Path) -> str | None:
    """The pid (as written) of the process holding `directory`'s run lock, or None when
    nobody holds it (a finished run's lock file stays behind, unlocked)."""
    path = Path(directory) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


# ---------------------------------------------------------------------------- small files

def json_safe(value: Any) -> Any:
    """Non-finite floats as None (strict JSON has no NaN or Infinity), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def temporary_for(path: Path) -> Path:
    """Where to write a file that is then renamed over `path`: beside it, one name per process
    (the processes of one torchrun may all write the same file, and two writing one
    temporary could rename a torn file into place)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write strict JSON to a temporary file and rename it over path (never a half-written
    file)."""
    tmp = temporary_for(path)
    try:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except BaseException:  # (a path that cannot be replaced, a full disk: no temporary left)
        tmp.unlink(missing_ok=True)
        raise


def append_log(path: Path, entry: dict[str, Any]) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(json_safe(entry), allow_nan=False) + "\n")


def truncate_log(path: Path, step: int) -> int:
    """Keep the log lines of steps up to `step` (what a resume from that checkpoint will not
    redo) and drop the rest, a torn last line included; returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if entry.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = temporary_for(path)
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


# ---------------------------------------------------------------------------- checkpoints

def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, hex (checkpoints' and pair shards' manifests)."""
    return _sha256(Path(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _non_finite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating tensor holding a non-finite value, or None."""
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _optimizer_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    return {f"state.{i}.{k}": v for i, entry in state.get("state", {}).items()
            for k, v in entry.items() if isinstance(v, Tensor)}


# A test hook for the fault-injection test: the process kills itself (SIGKILL) half-way
# through writing the checkpoint of this step.
_KILL_IN_CHECKPOINT = "ONESTEP_TEST_KILL_IN_CHECKPOINT"


def save_checkpoint(directory: Path, step: int, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, run_config: dict[str, Any], keep: int,
                    seconds: float = 0.0) -> Path:
    """Write checkpoints/step_<step>/ (model and EMA weights as safetensors, optimiser state,
    and state.json with the config, the training seconds so far and the manifest) into a
    temporary directory, then rename it; keep the newest `keep`. NonFiniteError, before
    anything is written, if a weight or optimiser tensor is not finite."""
    from safetensors.torch import save_file

    tensors = {name: {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
               for name, module in (("model", model), ("ema", ema))}
    optimizer_state = optimizer.state_dict()
    for what, named in (("model", tensors["model"]), ("ema", tensors["ema"]),
                        ("optimizer", _optimizer_tensors(optimizer_state))):
        bad = _non_finite(named)
        if bad is not None:
            raise NonFiniteError(f"step {step}: {what} tensor {bad!r} is not finite; the "
                                 f"checkpoint is not written (the older ones are kept)")
    root = Path(directory) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with WritingInto(tmp) as writing:
        writing.path = tmp / "model.safetensors"
        save_file(tensors["model"], str(writing.path))
        if os.environ.get(_KILL_IN_CHECKPOINT) == str(step):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        writing.path = tmp / "ema.safetensors"
        save_file(tensors["ema"], str(writing.path))
        writing.path = tmp / "optimizer.pt"
        torch.save(optimizer_state, writing.path)
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                    for name in FILES}
        state = {"step": step, "seconds": round(seconds, 3), "config": run_config,
                 "files": manifest}
        writing.path = tmp / "state.json"
        write_json_atomic(writing.path, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        try:
            shutil.rmtree(old)
        except OSError as err:  # (the newer checkpoints stand; a resume skips this one)
            print(f"onestep: could not remove the old checkpoint {old} ({err}); remove it "
                  "by hand", file=sys.stderr)
    return final


class WritingInto:
    """`with WritingInto(tmp) as writing:` around the writes into a temporary directory that
    is renamed once complete (a checkpoint, a pair shard): when one fails, the directory is
    removed, so nothing half-written is left, and a full disk becomes `disk_full`'s one-line
    MachineError naming `writing.path` (the file being written; `naming` to start with)."""

    def __init__(self, tmp: Path, naming: Path | None = None):
        self.tmp = tmp
        self.path = tmp if naming is None else naming

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if not isinstance(err, Exception):
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        disk = disk_full(err, self.path)
        if disk is not None:
            raise disk from err
        return False


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# safetensors' Rust writer: "I/O error: File too large (os error 27)", no OSError
_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def disk_full(err: BaseException, path: Path) -> MachineError | None:
    """A MachineError "no space left ... writing <path>" when `err` is a full disk or a file
    size limit, however it shows: OSError ENOSPC, EDQUOT or EFBIG, safetensors' SafetensorError
    carrying one of those as "(os error N)", or torch.save's "unexpected pos" (its zip writer's
    RuntimeError when a write came up short); else None."""
    rust = _RUST_IO_ERROR.search(str(err)) if type(err).__name__ == "SafetensorError" else None
    full = (isinstance(err, OSError) and err.errno in _FULL_ERRNOS) or (
        isinstance(err, RuntimeError) and "unexpected pos" in str(err)) or (
        rust is not None and int(rust.group(1)) in _FULL_ERRNOS)
    if not full:
        return None
    return MachineError(f"no space left on the device writing {path} (or a file size limit: "
                        f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}); "
                        "free some and run the same command to resume")


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete checkpoint directories left half-written by a crash (call holding the lock)."""
    removed = []
    for tmp in sorted((Path(directory) / CHECKPOINT_DIR).glob(".tmp_step_*")):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """state.json of a checkpoint; CheckpointError naming it if it is not readable JSON with
    a step and a config."""
    path = Path(checkpoint) / "state.json"
    try:
        state = json.loads(path.read_text())
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror})") from None
    except ValueError:
        raise CheckpointError(f"{path}: truncated or not JSON (not a checkpoint's state)") \
            from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint's state (no step and config)")
    return state


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's state after checking each file against the manifest (size, sha256);
    CheckpointError naming the first file that differs."""
    checkpoint = Path(checkpoint)
    state = read_checkpoint_state(checkpoint)
    for name, expected in state.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says "
                                  f"{expected['bytes']} (truncated or overwritten)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: its contents differ from the manifest's checksum "
                                  "(damaged)")
    return state


def checkpoints(directory: Path) -> list[Path]:
    """Complete-looking checkpoints (a state.json) under a run, its checkpoints/ folder, or
    one checkpoint, newest first."""
    directory = Path(directory)
    if (directory / "state.json").is_file():
        return [directory]
    root = directory / CHECKPOINT_DIR if (directory / CHECKPOINT_DIR).is_dir() else directory
    found = [p for p in root.glob("step_*") if (p / "state.json").is_file()]
    return sorted(found, reverse=True)


def latest_checkpoint(directory: Path, verify: bool = True, report=None) -> Path | None:
    """The newest intact checkpoint under `directory` (see `checkpoints`); damaged ones are
    skipped with a line to `report` (stderr by default) naming them and why. None when there
    is none; CheckpointError when the only candidates are damaged."""
    found = checkpoints(directory)
    problems = []
    for checkpoint in found:
        if not verify:
            return checkpoint
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as err:
            problems.append(str(err))
            print(f"onestep: skipping damaged checkpoint {checkpoint.name}: {err}",
                  file=report or sys.stderr)
            continue
        return checkpoint
    if problems:
        raise CheckpointError(problems[0] + " (no intact checkpoint left)")
    return None


def run_directory(path: Path) -> Path:
    """The run directory that a run, its checkpoints/ folder or one of its checkpoints
    belongs to."""
    path = Path(path).resolve()
    if (path / "state.json").is_file() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent
    if path.name == CHECKPOINT_DIR:
        return path.parent
    return path


def load_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; CheckpointError naming the file if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_into(module: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    """module.load_state_dict(tensors), after checking names, shapes and finiteness;
    CheckpointError naming the file and the first difference."""
    expected = module.state_dict()
    # (BatchNorm fills in a missing step counter itself, as older files lack it)
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        which = (f"lacks {missing[0]!r}" if missing else f"has an unknown tensor "
                 f"{unexpected[0]!r}")
        raise CheckpointError(f"{source}: weights of another model: the file {which} "
                              f"({len(missing)} missing, {len(unexpected)} unknown)")
    for k, v in expected.items():
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: weights of another model: {k!r} is "
                                  f"{tuple(tensors[k].shape)} in the file, {tuple(v.shape)} "
                                  "in this model")
    bad = _non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{source}: tensor {bad!r} holds non-finite values")
    module.load_state_dict(tensors)


def load_weights(module: nn.Module, checkpoint: Path, which: str = "ema") -> None:
    path = Path(checkpoint) / f"{which}.safetensors"
    load_into(module, load_tensors(path), path)


def load_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Path,
                   device: torch.device) -> None:
    path = Path(checkpoint) / "optimizer.pt"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        optimizer.load_state_dict(state)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{path}: not this run's optimizer state "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") \
            from None
