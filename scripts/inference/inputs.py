"""Inference inputs: one slide file (or DICOM-WSI series folder), a folder of slides, a folder with ``manifest.csv``, or
a manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from scripts.data.ids import case_clash
from scripts.data.manifest import SlideRecord, read_manifest
from scripts.errors import BundleInputError
from scripts.wsi.formats import dicom_folder

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def input_records(source: str | Path, mpp: float | None = None, label_map: dict | None = None,
                  task: str = "classification") -> list[SlideRecord]:
    """Records for ``source``; slides without a label get label -1. ``mpp`` fills in slides lacking it; ``task`` is the
    checkpoint's (a survival manifest's ``time`` / ``event`` are read when given)."""
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".csv":
        records = read_manifest(src, label_map, require_labels=False, task=task)
    elif src.is_dir() and (src / "manifest.csv").is_file():
        records = read_manifest(src / "manifest.csv", label_map, require_labels=False, task=task)
    elif dicom_folder(src) is not None:  # one DICOM-WSI series (its folder, or one of its .dcm files)
        folder = dicom_folder(src)
        records = [SlideRecord(folder.name, folder.name, str(folder), -1)]
    elif src.is_dir():
        entries = list(src.rglob("*"))
        files = sorted([p for p in entries if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file()]
                       + [p for p in entries if p.is_dir() and dicom_folder(p) is not None])  # DICOM-WSI: one folder each
        if not files:
            raise BundleInputError(src, "folder holds no slide files", f"put slides ({', '.join(SLIDE_SUFFIXES[:4])}, ..., DICOM-WSI folders) or a manifest.csv in it")
        stems = [p.stem for p in files]
        clash = case_clash(stems)  # the same name, or names that differ only in case (one folder on macOS/Windows)
        if clash is not None:
            raise BundleInputError(src, f"several slides share the name {sorted({stems[clash[0]], stems[clash[1]]})} (letter case aside)",
                                   "rename them or pass a manifest with unique slide ids")
        records = [SlideRecord(p.stem, p.stem, str(p), -1) for p in files]
    elif src.is_file():
        records = [SlideRecord(src.stem, src.stem, str(src), -1)]
    else:
        raise BundleInputError(src, "input not found", "pass --input with a slide file, a folder of slides or a manifest CSV")
    if mpp is not None:
        records = [r if r.mpp is not None else dataclasses.replace(r, mpp=float(mpp)) for r in records]
    return records
