"""Slide formats beyond one file: DICOM-WSI series (docs/formats.md).

A DICOM whole-slide image is a series of files, one per pyramid level (plus label, overview), usually in one folder
with UID file names. The bundle takes the folder (or any one ``.dcm`` file of it, which names the same slide) as
the slide: the manifest's ``path``, an inference ``--input``, or one sub-folder of an input folder. OpenSlide 4
(shipped by openslide-bin) reads the series from any of its files; the reader is given the largest file (level 0).
One series per folder. The cache fingerprints every ``.dcm`` file of the folder, so a changed level is noticed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scripts.cache import file_fingerprint

DICOM_SUFFIX = ".dcm"
#: the backends that read DICOM-WSI (cuCIM and tifffile do not)
DICOM_BACKENDS = ("openslide",)


def dicom_folder(path: str | os.PathLike) -> Path | None:
    """The series folder when ``path`` is a DICOM-WSI folder or one ``.dcm`` file of it, else ``None``."""
    p = Path(path)
    if p.suffix.lower() == DICOM_SUFFIX and p.is_file():
        return p.parent
    if p.is_dir() and any(c.suffix.lower() == DICOM_SUFFIX and c.is_file() for c in p.iterdir()):
        return p
    return None


def slide_path(path: str | os.PathLike) -> Path:
    """The slide's canonical path: a DICOM series folder for any of its files, the path itself otherwise."""
    return dicom_folder(path) or Path(path)


def is_slide(path: str | os.PathLike) -> bool:
    """A slide file, or a DICOM-WSI folder."""
    p = Path(path)
    return p.is_file() or dicom_folder(p) is not None


def reader_path(path: str | os.PathLike) -> str:
    """What the WSI reader opens: the largest ``.dcm`` file of a DICOM series (level 0), the path itself otherwise."""
    folder = dicom_folder(path)
    if folder is None:
        return str(path)
    files = sorted((f for f in folder.iterdir() if f.suffix.lower() == DICOM_SUFFIX and f.is_file()), key=lambda f: (-f.stat().st_size, f.name))
    return str(files[0])


def slide_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Content fingerprint of a slide: :func:`scripts.cache.file_fingerprint` of the file, or of every file of a DICOM
    series (sorted by name)."""
    folder = dicom_folder(path)
    if folder is None:
        return file_fingerprint(path)
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() == DICOM_SUFFIX and f.is_file())
    return {"name": folder.name, "format": "dicom", "files": [file_fingerprint(f) for f in files]}
