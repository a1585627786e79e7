"""Stopping a run: the first SIGINT/SIGTERM asks for a stop at the next step boundary (the
trainer checkpoints there), the second ends the process at once, even inside a long native op,
so that Ctrl-C twice and `timeout` always work.

Python runs its signal handlers only between bytecodes of the main thread, and a main thread
inside one long op (a huge batch's matrix product) runs none until the op returns. The C-level
handler still runs at once: it writes the signal's number to the wakeup fd
(`signal.set_wakeup_fd`), where a watcher thread reads it. That thread runs while the main
thread is in the op, because torch's ops (and onestep's launchers) release the GIL; on the
second signal it says so in one line and ends the process with `os._exit` (exit 130, no
cleanup: what is on disk is whole, as a kill would leave it, and the run resumes from its last
checkpoint).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Self

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_AT_ONCE = 130


class StopSignals:
    """For the life of the context (in the main thread; elsewhere it does nothing): SIGINT and
    SIGTERM call `on_first(signum)` from Python's handler (between bytecodes, as before); the
    watcher says on stderr, at once, that the run stops at the next step boundary, and on the
    second signal prints `at_once()`'s line and exits 130. The previous handlers and wakeup fd
    are restored on exit."""

    def __init__(self, on_first: Callable[[int], None], at_once: Callable[[], str]):
        self.on_first, self.at_once = on_first, at_once
        self._handlers: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._previous_fd = -1

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            return self  # (signal handlers can only be set from the main thread)
        read, write = os.pipe()
        os.set_blocking(write, False)  # (the C handler must never block)
        self._pipe = (read, write)
        self._handlers = {sig: signal.signal(sig, lambda signum, frame: self.on_first(signum))
                          for sig in STOP_SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="onestep-stop-signals",
                                         daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        seen = 0
        while True:
            try:
                data = os.read(self._pipe[0], 64)
            except OSError:
                return
            if not data:
                return  # the write end closed: the context ended
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                seen += 1
                if seen == 1:
                    print(f"onestep: {signal.Signals(signum).name}: stopping at the next step "
                          "boundary with a checkpoint (again to stop at once)", file=sys.stderr,
                          flush=True)
                else:
                    print(f"onestep: {signal.Signals(signum).name} again: {self.at_once()}",
                          file=sys.stderr, flush=True)
                    os._exit(EXIT_AT_ONCE)

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        read, write = self._pipe
        os.close(write)  # the watcher reads the end of the pipe and returns
        self._watcher.join(timeout=5)
        os.close(read)
        self._pipe = None
