"""Per-slide error policy of the data stages (``on_error: raise | skip``).

With ``skip`` a slide that fails with a :class:`scripts.errors.BundleInputError` (unreadable, truncated,
no mpp, no tissue, ...) is left out: it is appended to ``<output_dir>/failures.csv`` (stage, slide id,
path, reason, fix; rewritten atomically) and the run goes on with the other slides. When the process ends
the failures are summarised on stderr and the exit code is 1, so a scheduler sees that something was
skipped. Other exceptions (bugs, out of memory) always stop the run.
"""

from __future__ import annotations

import atexit
import csv
import io
import logging
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

from scripts.cache import atomic_write_bytes
from scripts.errors import BundleInputError, DiskFullError, find_input_error

logger = logging.getLogger(__name__)
T = TypeVar("T")
POLICIES = ("raise", "skip")
_FAILURES: list[dict[str, str]] = []
_FILES: set[Path] = set()
_HOOKED = False


def check_policy(on_error: str) -> str:
    """Validate an ``on_error`` value."""
    if str(on_error) not in POLICIES:
        raise BundleInputError("on_error", f"unknown policy '{on_error}'", f"use one of {POLICIES}")
    return str(on_error)


def failures() -> list[dict[str, str]]:
    """Failures recorded in this process (copies)."""
    return [dict(f) for f in _FAILURES]


def record(stage: str, slide_id: str, err: BundleInputError, output_dir: str | os.PathLike | None) -> None:
    """Remember a skipped slide, rewrite ``failures.csv`` and arm the exit summary."""
    global _HOOKED
    row = {"stage": stage, "slide_id": slide_id, "path": err.path, "reason": err.reason, "fix": err.fix}
    if row in _FAILURES:
        return
    _FAILURES.append(row)
    logger.warning("skipping slide %s (%s): %s", slide_id, stage, err)
    if output_dir is not None:
        path = Path(output_dir) / "failures.csv"
        _FILES.add(path)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(row), lineterminator="\n")
        w.writeheader()
        w.writerows(_FAILURES)
        atomic_write_bytes(path, buf.getvalue().encode())
    if not _HOOKED:
        atexit.register(_exit_summary)  # registered late, so it runs before earlier handlers (LIFO)
        _HOOKED = True


def guarded(on_error: str, stage: str, slide_id: str, output_dir, fn: Callable[..., T], *args, **kwargs) -> T | None:
    """``fn(*args, **kwargs)``; with ``on_error == 'skip'`` an input error is recorded and None returned."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - filtered below
        found = find_input_error(exc)
        if check_policy(on_error) == "raise" or found is None or isinstance(found, DiskFullError):
            raise  # a full disk is no fault of the slide: never skipped
        record(stage, slide_id, found, output_dir)
        return None


def _exit_summary() -> None:
    if not _FAILURES:
        return
    where = ", ".join(str(p) for p in sorted(_FILES)) or "the log"
    lines = [f"error: {len(_FAILURES)} slide(s) skipped (on_error=skip); details in {where}:"]
    lines += [f"  {f['stage']}: {f['slide_id']}: {f['reason']}" for f in _FAILURES[:20]]
    if len(_FAILURES) > 20:
        lines.append(f"  ... and {len(_FAILURES) - 20} more")
    sys.stdout.flush()
    print("\n".join(lines), file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)  # the work that could be done is done; the exit code says that some slides were not
