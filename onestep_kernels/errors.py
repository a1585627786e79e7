"""The one error hierarchy of onestep (both packages), and how the command line reports each.

Every error onestep raises on purpose says, in one line, what is wrong and where (the argument,
the file, the step), and is one of:

- `UserError`: of the user's making: a bad argument (`ArgumentError`, also a ValueError;
  `ArgumentTypeError`, also a TypeError), bad or damaged data or files (`DataError`), a
  setting that cannot apply. The command line prints the line and exits 2.
- `MachineError`: of the machine's: a full disk, no memory, a device that failed. Exit 1,
  one line. `classify` counts the standard library's and torch's own errors of that kind
  (OSError ENOSPC/EDQUOT/EIO/ENOMEM, MemoryError, torch.OutOfMemoryError) as machine
  errors too, and a missing or unreadable file the user named as a user error.
- `RunStopped`: a run that stops on its own terms, not by anyone's mistake (a non-finite
  loss, an interrupt): its line and its own exit code.

Anything else is a bug in onestep: the command line shows its traceback and asks for a
report (`report`).
"""

from __future__ import annotations

import errno
import sys
import traceback

USER_EXIT, MACHINE_EXIT, BUG_EXIT = 2, 1, 1
REPORT = ("this is a bug in onestep, not in what you asked for: please report it with the "
          "traceback above and the command you ran")


class OnestepError(Exception):
    """The base of every error onestep raises on purpose; `exit_code` is the command line's."""

    exit_code = BUG_EXIT


class UserError(OnestepError):
    """Of the user's making: arguments, data, a damaged or foreign file (exit 2)."""

    exit_code = USER_EXIT


class ArgumentError(UserError, ValueError):
    """A bad argument value; the message starts with the argument's name."""


class ArgumentTypeError(UserError, TypeError):
    """An argument of the wrong kind or dtype; the message starts with the argument's name."""


class DataError(UserError, ValueError):
    """Data or a file that cannot be used as it is (damaged, changed, foreign); the message
    names the file."""


class MachineError(OnestepError):
    """Of the machine's: disk full, out of memory, a failing device (exit 1)."""

    exit_code = MACHINE_EXIT


class RunStopped(OnestepError):
    """A run that stopped on its own terms (exit code per subclass)."""


_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EROFS}
_USER_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                  FileExistsError)


def classify(err: BaseException) -> str:
    """"user", "machine", "stopped" or "bug": how the command line reports `err`."""
    if isinstance(err, (UserError,) + _USER_OSERRORS):
        return "user"
    if isinstance(err, MachineError) or isinstance(err, MemoryError) or (
            isinstance(err, OSError) and err.errno in _MACHINE_ERRNOS):
        return "machine"
    if type(err).__name__ == "OutOfMemoryError" and "torch" in type(err).__module__:
        return "machine"
    if isinstance(err, RunStopped):
        return "stopped"
    return "bug"


def report(err: BaseException, program: str = "onestep") -> int:
    """Print `err` as the command line does and return its exit code: one line for an error
    of the user's or the machine's, or a run that stopped; the traceback and a request for a
    report for a bug."""
    kind = classify(err)
    if kind == "bug":
        traceback.print_exception(err)
        print(f"{program}: internal error: {type(err).__name__}: {err}\n{program}: {REPORT}",
              file=sys.stderr)
        return BUG_EXIT
    line = str(err).strip() or type(err).__name__
    if kind == "stopped":
        print(f"{program}: {line}", file=sys.stderr)
        return err.exit_code
    print(f"{program}: error: {line}", file=sys.stderr)
    return USER_EXIT if kind == "user" else MACHINE_EXIT


def headline(err: BaseException) -> str:
    """An error in one line: its type and the first line of its message (for records that
    list failures: measurements, the GPU pass)."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
