"""The `onestep` command, one module per command:

    onestep train RECIPE --out RUN ...   # train: flow, direct, slimflow or slt     (train.py)
    onestep demo --out runs/demo         # a Direct Model on the embedded digits    (demo.py)
    onestep pairs --teacher RUN --out P  # a teacher's (noise, sample) pairs         (pairs.py)
    onestep sample --ckpt RUN --out s.png                                          (sample.py)
    onestep eval --ckpt RUN                                                      (evaluate.py)

Their arguments are in arguments.py; what they run is in onestep_models (runs, evaluation,
slimflow_run, screening_run). Errors of the user's making (bad arguments, missing, damaged or
foreign files, changed settings or data, a run directory in use) end with a one-line message
and exit code 2; of the machine's (a full disk, no memory) with one line and exit code 1; a run
that stops on its own terms says why (a non-finite loss: 1; an interrupt: 130); anything else
is a bug in onestep, shown with its traceback and a request for a report
(onestep_kernels.errors).
"""

from __future__ import annotations

import sys

from onestep_kernels.errors import report
from onestep_models.cli import demo, evaluate, pairs, sample, train
from onestep_models.cli.arguments import UsageError, build_parser, device_from

__all__ = ["COMMANDS", "UsageError", "build_parser", "entry_point", "main"]

COMMANDS = {"train": train.run, "demo": demo.run, "pairs": pairs.run, "sample": sample.run,
            "eval": evaluate.run}


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, device_from(args.device))
    except KeyboardInterrupt:  # Ctrl-C outside training (whose own handler checkpoints first)
        print(f"onestep: interrupted{_interrupted_note(argv)}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - each kind reported as onestep_kernels.errors says
        return report(err)


def _interrupted_note(argv: list[str] | None) -> str:
    command = (sys.argv[1:] if argv is None else argv)[:1]
    if command == ["pairs"]:
        return " (the finished shards are kept: run the same command to draw the rest)"
    return ""


def entry_point() -> None:
    sys.exit(main())
