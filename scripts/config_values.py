"""Values as they arrive from a bundle config or the command line (one place for each conversion)."""

from __future__ import annotations

from typing import Any

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off", "none", "null", "")


def as_bool(value: Any) -> bool:
    """``True``/``False`` from a bool, a number or a command-line string (``--progress False``, ``--x yes``).

    Raises ``ValueError`` for anything else, so a typo is never read as ``False``.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean: use True or False")
