"""Ctrl-C (SIGINT) and SIGTERM end a command with one line and exit 130 / 143, not a traceback.

Every cache entry, output folder and checkpoint is written under a temporary name and renamed
(:mod:`scripts.cache`), so an interrupted command leaves nothing torn and the same command resumes where it
stopped. The handler prints ``interrupted (SIGINT): rerun the same command to resume`` on stderr and raises
:class:`SystemExit` (``128 + signal``), so ``finally`` blocks and ``atexit`` hooks (temporary files, MLflow's
run) still run; a second signal during that clean-up ends the process at once. ``--debug`` also prints where
the command was. Worker processes forked after the handlers were
installed (data loaders) keep Python's default: they end quietly with their parent.

Where the work runs off the main thread (the MONAI Deploy app: Holoscan runs operators on its own threads and
keeps the main thread inside ``Application.run``), Python's handler only runs once that call returns.
:func:`watch_for_stop` therefore also has the signal written to a pipe (``signal.set_wakeup_fd``; Holoscan's own
handler calls the one installed before it) that a watcher thread reads; the work polls :func:`check_stop` at
safe points (between feature batches and between slides) and unwinds with :class:`StopRequested`. A second
signal ends the process at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

logger = logging.getLogger(__name__)

#: what the interrupted command prints (after ``interrupted (<signal>): ``)
RESUME_HINT = "rerun the same command to resume"
_installed_in: int | None = None
_interrupted = False
_stop_signal: int | None = None  # the first signal the watcher saw (watch_for_stop)
_handed_over = False  # inside watch_for_stop: the watcher thread, not the main thread's handler, acts
_watcher_started = False


class StopRequested(BaseException):
    """Raised by :func:`check_stop` in the thread doing the work once SIGINT / SIGTERM arrived. A
    ``BaseException``, like ``KeyboardInterrupt``, so per-slide ``except Exception`` handlers (``on_error='skip'``)
    do not record it as a failed slide."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(interrupted_line(signum))


def interrupted_line(signum: int) -> str:
    """What an interrupted command prints on stderr: ``interrupted (SIGTERM): rerun the same command to resume``."""
    return f"interrupted ({signal.Signals(signum).name}): {RESUME_HINT}"


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _installed_in:  # a forked worker: end like Python's default, quietly (the parent reports)
        raise KeyboardInterrupt
    if _handed_over:  # watch_for_stop: the work stops at its next check_stop, the caller reports
        return
    global _interrupted
    if _interrupted:  # a second signal while cleaning up: leave at once
        os._exit(exit_code(signum))
    _interrupted = True
    if "--debug" in sys.argv and frame is not None:
        traceback.print_stack(frame, file=sys.stderr)
    print(interrupted_line(signum), file=sys.stderr, flush=True)
    raise SystemExit(exit_code(signum))


def install_interrupt_handlers() -> bool:
    """Handle SIGINT and SIGTERM in this (main) process as the module docstring says; returns True (False when
    called off the main thread, where Python cannot install signal handlers)."""
    global _installed_in
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _handler)
    except ValueError:  # not the main thread
        return False
    _installed_in = os.getpid()
    return True


@contextmanager
def watch_for_stop() -> Iterator[bool]:
    """While the main thread is handed to native code that runs the work on other threads (``Application.run``
    of the Deploy app), learn of SIGINT / SIGTERM through a watcher thread and let the work stop at its next
    :func:`check_stop` (the module docstring); the main thread's handler does nothing meanwhile. Yields whether
    the watcher runs (False off the main thread, or where another wakeup file descriptor, e.g. an asyncio
    loop's, is set). After the block, :func:`stop_signal` says whether the work was stopped."""
    global _handed_over
    watching = _start_watcher()
    _handed_over = watching
    try:
        yield watching
    finally:
        _handed_over = False


def _start_watcher() -> bool:
    global _watcher_started
    if _watcher_started:
        return True
    if not install_interrupt_handlers():
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    if previous != -1:  # someone else's wakeup fd: leave it
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
        return False
    threading.Thread(target=_watch, args=(read_fd,), name="csmil-stop-watcher", daemon=True).start()
    _watcher_started = True
    return True


def _watch(read_fd: int) -> None:
    global _stop_signal
    while True:
        data = os.read(read_fd, 16)
        if not data:
            return
        for signum in data:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            if _stop_signal is not None:  # the second one: leave at once
                print(f"interrupted again ({signal.Signals(signum).name}): stopping now", file=sys.stderr, flush=True)
                os._exit(exit_code(signum))
            _stop_signal = int(signum)
            logger.warning("%s received: stopping after the current step (again to stop at once)", signal.Signals(signum).name)


def stop_signal() -> int | None:
    """The signal :func:`watch_for_stop`'s watcher saw first, or None."""
    return _stop_signal


def check_stop() -> None:
    """Raise :class:`StopRequested` when a stop signal arrived (:func:`watch_for_stop`); a no-op otherwise (also
    in every process that did not call it, where the signal handler itself ends the command)."""
    if _stop_signal is not None:
        raise StopRequested(_stop_signal)
