"""Ctrl-C (SIGINT) and SIGTERM end a command with one line and exit 130 / 143, not a traceback.

Every cache entry, output folder and checkpoint is written under a temporary name and renamed
(:mod:`scripts.cache`), so an interrupted command leaves nothing torn and the same command resumes where it
stopped. The handler prints ``interrupted (SIGINT): rerun the same command to resume`` on stderr and raises
:class:`SystemExit` (``128 + signal``), so ``finally`` blocks and ``atexit`` hooks (temporary files, MLflow's
run) still run; a second signal during that clean-up ends the process at once. ``--debug`` also prints where
the command was. Worker processes forked after the handlers were
installed (data loaders) keep Python's default: they end quietly with their parent.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from types import FrameType

#: what the interrupted command prints (after ``interrupted (<signal>): ``)
RESUME_HINT = "rerun the same command to resume"
_installed_in: int | None = None
_interrupted = False


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _installed_in:  # a forked worker: end like Python's default, quietly (the parent reports)
        raise KeyboardInterrupt
    global _interrupted
    if _interrupted:  # a second signal while cleaning up: leave at once
        os._exit(exit_code(signum))
    _interrupted = True
    if "--debug" in sys.argv and frame is not None:
        traceback.print_stack(frame, file=sys.stderr)
    print(f"interrupted ({signal.Signals(signum).name}): {RESUME_HINT}", file=sys.stderr, flush=True)
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
