"""Slide and patient ids are data, never paths: the folder name an id gets on disk.

A manifest's ``slide_id`` may hold any text (``../../x``, ``case/1``, ``C:\\x``, control characters, 300
characters). Every folder or file named after a slide (tiles and feature cache entries, inference output
folders, lesion masks) uses :func:`folder_name` instead of the id itself; the id is kept verbatim in
``meta.json``, ``prediction.json`` and the CSVs.

* A *plain* id (letters, digits, ``. _ + -``; starts with a letter or digit; at most 100 characters; not a
  Windows device name such as ``CON``; not ending in ``-`` + 12 hex digits) is its own folder name, so the
  usual ids (``TCGA-AA-3812``, ``demo-p001-s0``) keep readable folders and existing caches stay valid.
* Any other id becomes its plain characters (others replaced by ``_``, at most 60) + ``-`` + the first
  12 hex digits of the id's SHA-256. Such a name always ends in the hash and a plain name never does, so two
  different ids never share a folder.

Ids that differ only in case (``Case1``, ``case1``) would share a folder on case-insensitive file systems
(macOS, Windows): the manifest reader refuses them (:func:`case_clash`).
"""

from __future__ import annotations

import hashlib
import re

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_HASHED = re.compile(r".*-[0-9a-f]{12}")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def is_plain(identifier: str) -> bool:
    """Whether ``identifier`` is used unchanged as a folder name (see the module docstring)."""
    return (bool(_PLAIN.fullmatch(identifier)) and not identifier.endswith(".")
            and identifier.split(".")[0].lower() not in _RESERVED and not _HASHED.fullmatch(identifier))


def folder_name(identifier: str) -> str:
    """A file-system-safe, collision-free name for ``identifier`` (the id itself when it is plain)."""
    identifier = str(identifier)
    if is_plain(identifier):
        return identifier
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", identifier).strip("._-")[:60] or "id"
    if stem.split(".")[0].lower() in _RESERVED:  # Windows reads 'NUL.txt-…' as the device NUL
        stem = "_" + stem
    return f"{stem}-{hashlib.sha256(identifier.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def case_clash(ids: list[str]) -> tuple[int, int] | None:
    """Positions ``(first, second)`` of the first two ids whose folder names differ only in case, else None."""
    seen: dict[str, int] = {}
    for i, identifier in enumerate(ids):
        key = folder_name(identifier).casefold()
        if key in seen:
            return seen[key], i
        seen[key] = i
    return None
