"""User-facing errors: one readable line naming the file, the reason and the fix."""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType

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


def find_input_error(exc: BaseException | None) -> BundleInputError | None:
    """The :class:`BundleInputError` in an exception's cause/context chain (MONAI wraps config errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BundleInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, _default=sys.excepthook
) -> None:
    found = find_input_error(exc)
    if found is not None and "--debug" not in sys.argv:
        logger.debug("input error", exc_info=(exc_type, exc, tb))
        print(f"error: {found}", file=sys.stderr)
        return
    _default(exc_type, exc, tb)


def install_excepthook() -> bool:
    """Print :class:`BundleInputError` as one line on stderr (full traceback with ``--debug``).

    Called from the configs' ``imports`` so that ``python -m monai.bundle run ...`` reports bad input
    without a traceback; the exit code stays non-zero.
    """
    sys.excepthook = _excepthook
    return True
