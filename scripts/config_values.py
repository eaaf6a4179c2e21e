"""Values as they arrive from a bundle config or the command line (one place for each conversion)."""

from __future__ import annotations

from typing import Any, Optional

from scripts.errors import BundleInputError

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off", "none", "null", "")


def as_bool(value: Any, name: Optional[str] = None) -> bool:
    """``True``/``False`` from a bool, a number or a command-line string (``--progress False``, ``--progress
    false``, ``--x yes``; Python Fire passes what it cannot read as a literal on as a string).

    Raises ``ValueError`` for anything else, so a typo is never read as ``False``; a
    :class:`~scripts.errors.BundleInputError` naming ``--name`` when the config id ``name`` is given.
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
    if name is not None:
        raise BundleInputError(f"--{name}", f"{value!r} is not a yes/no value", f"pass --{name} with True or False")
    raise ValueError(f"{value!r} is not a boolean: use True or False")
