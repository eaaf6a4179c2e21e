"""User-facing errors: one readable line naming the file, the reason and the fix."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Iterator

logger = logging.getLogger(__name__)


class BundleInputError(ValueError):
    """Bad input detected at a boundary (manifest, slide, config, checkpoint).

    The message always names the offending ``path`` (file or row), the ``reason`` and the ``fix``.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str, fix: str) -> None:
        self.path = str(path) if path is not None else "<input>"
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.path}: {reason}. Fix: {fix}")


def first_line(err: BaseException, limit: int = 120) -> str:
    """The first line of an error's text for a one-line message: terminal colour codes removed, cut at a word."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


class DiskFullError(BundleInputError):
    """A write failed because the device holding ``path`` is full (or over quota); ``detail``: the system's words."""

    detail = "No space left on device"


#: errno values of a full device or an exhausted quota
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
#: what torch's zip writer says when a write comes up short (it raises RuntimeError, not OSError)
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")
DISK_FULL_FIX = ("free space on that disk, or pass --output_dir (and --cache_dir, --ckpt_dir) on a disk with room, then run "
                 "the same command again: finished work is kept")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space (OSError ENOSPC/EDQUOT, or torch's short write)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_SHORT_WRITE)


def disk_full_error(exc: BaseException, folder: str | os.PathLike | None = None, what: str | None = None) -> DiskFullError:
    """The one-line error for a failed write of ``what`` into ``folder`` (by default the file and folder the
    error names, if it names one)."""
    name = getattr(exc, "filename", None)
    if folder is None and name:
        folder = os.path.dirname(str(name))
    if what is None:
        what = f"'{os.path.basename(str(name))}'" if name else "a file"
    if isinstance(exc, DiskFullError):
        detail = exc.detail
    else:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else "short write"
    err = DiskFullError(folder if folder is not None else "<output>", f"no space left on the device while writing {what} ({detail})",
                        DISK_FULL_FIX)
    err.detail = detail
    return err


@contextmanager
def writing(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a full disk inside the block into one :class:`DiskFullError` naming ``folder`` and ``what`` (e.g.
    ``"the feature store entry of slide 'a'"``); any other error passes unchanged. Nested, the outermost names it
    (the user's folder, not a temporary one inside it)."""
    try:
        yield
    except DiskFullError as exc:
        raise disk_full_error(exc, folder, what) from exc
    except (OSError, RuntimeError) as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, folder, what) from exc
        raise


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and its causes / contexts, outermost first (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def find_input_error(exc: BaseException | None) -> BundleInputError | None:
    """The :class:`BundleInputError` in an exception's cause/context chain (MONAI wraps config errors); a full disk
    met outside :func:`writing` becomes a :class:`DiskFullError` naming the file it was writing."""
    found = next((e for e in exception_chain(exc) if isinstance(e, BundleInputError)), None)
    if found is not None:
        return found
    full = next((e for e in exception_chain(exc) if is_disk_full(e)), None)
    return None if full is None else disk_full_error(full)


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, _default=sys.excepthook
) -> None:
    found = find_input_error(exc)
    if found is not None and not debug():
        logger.debug("input error", exc_info=(exc_type, exc, tb))
        print(f"error: {found}", file=sys.stderr)
        return
    _default(exc_type, exc, tb)


def install_excepthook(signals: bool | None = None) -> bool:
    """Print :class:`BundleInputError` (and a full disk) as one line on stderr (full traceback with ``--debug``).

    Called from the configs' ``imports`` so that ``python -m monai.bundle run ...`` reports bad input
    without a traceback; the exit code stays non-zero. ``signals`` (default: when this process is a
    ``python -m monai.bundle`` command) also makes SIGINT / SIGTERM end the command with one line
    (:mod:`scripts.interrupts`); a test or notebook importing the bundle keeps its own Ctrl-C.
    """
    sys.excepthook = _excepthook
    if signals is None:
        signals = bool(sys.argv) and is_bundle_main(sys.argv[0])
    if signals:
        from scripts.interrupts import install_interrupt_handlers

        install_interrupt_handlers()
    return True


def is_bundle_main(prog: str) -> bool:
    """Whether ``prog`` (``sys.argv[0]``) is ``python -m monai.bundle``."""
    p = Path(prog)
    return prog == "monai.bundle" or (p.name == "__main__.py" and p.parent.name == "bundle" and p.parent.parent.name == "monai")


def debug() -> bool:
    """Whether the command asked for full tracebacks (``--debug``)."""
    return "--debug" in sys.argv
