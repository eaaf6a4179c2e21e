"""Manifest CSV: ``slide_id, patient_id, path, label`` (+ optional ``mpp``, ``split``).

Manifests are data: they are parsed, validated and never evaluated. ``path`` is absolute or relative to
the manifest's folder; ``label`` is 0/1 or a class name mapped through ``label_map``.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from scripts.cache import atomic_write_bytes
from scripts.errors import BundleInputError

logger = logging.getLogger(__name__)

REQUIRED = ("slide_id", "patient_id", "path", "label")


@dataclass(frozen=True)
class SlideRecord:
    """One slide of a cohort."""

    slide_id: str
    patient_id: str
    path: str
    label: int
    mpp: float | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


#: values of the optional ``split`` column (``valid`` and ``validation`` are read as ``val``)
SPLITS = ("train", "val", "valid", "validation", "test")


def read_manifest(
    manifest: str | Path, label_map: Mapping[str, int] | None = None, check_paths: bool = True,
    require_labels: bool = True,
) -> list[SlideRecord]:
    """Parse and validate a manifest; every problem names its row and the fix.

    With ``require_labels=False`` (inference) the ``label`` column may be absent or empty (label -1).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise BundleInputError(manifest, "manifest not found", "pass --dataset_dir pointing at a folder with manifest.csv, or --manifest")
    label_map = {str(k): int(v) for k, v in (label_map or {"0": 0, "1": 1}).items()}
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header and (require_labels or c != "label")]
        if missing:
            raise BundleInputError(manifest, f"missing column(s) {missing} (found {header})", f"the header must contain {list(REQUIRED)}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    if not rows:
        raise BundleInputError(manifest, "manifest has no rows", "add one row per slide")
    records, seen, files = [], {}, {}
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{manifest}:{i}"
        sid, pid = row["slide_id"], row["patient_id"]
        if not sid:
            raise BundleInputError(where, "empty slide_id", "give every slide a unique id")
        if not pid:
            raise BundleInputError(where, f"empty patient_id for slide '{sid}'", "give every slide its patient's id (splits are by patient)")
        if sid in seen:
            raise BundleInputError(where, f"duplicate slide_id '{sid}' (first at row {seen[sid]})", "make slide ids unique")
        seen[sid] = i
        if not require_labels and not row.get("label"):
            label = -1
        elif row["label"] not in label_map:
            raise BundleInputError(where, f"unknown label '{row['label']}' for slide '{sid}'", f"use one of {sorted(label_map)} or extend 'label_map' in the config")
        else:
            label = label_map[row["label"]]
        path = Path(row["path"])
        if not path.is_absolute():
            path = manifest.parent / path
        if check_paths and not path.is_file():
            raise BundleInputError(where, f"slide file '{path}' does not exist", "fix the path (relative paths are resolved against the manifest's folder)")
        key = str(path.resolve()) if path.exists() else str(path)
        if key in files:
            first, first_sid, first_pid = files[key]
            same = "the same patient" if first_pid == pid else f"patient '{first_pid}' there, '{pid}' here"
            raise BundleInputError(where, f"slide file '{path}' is already listed at row {first} (slide '{first_sid}'; {same})",
                                   "list each slide file once (one slide id, one patient)")
        files[key] = (i, sid, pid)
        split = (row.get("split") or "").lower() or None
        if split is not None and split not in SPLITS:
            raise BundleInputError(where, f"split '{row['split']}' for slide '{sid}' is not one of {list(SPLITS)}",
                                   "write train, val or test in the 'split' column (or leave it empty)")
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                raise BundleInputError(where, f"mpp '{row['mpp']}' is not a number", "write microns per pixel as a number, e.g. 0.25") from None
        records.append(SlideRecord(sid, pid, str(path), label, mpp, split))
    labels_by_patient: dict[str, set[int]] = {}
    for r in records:
        labels_by_patient.setdefault(r.patient_id, set()).add(r.label)
    mixed = [p for p, ls in labels_by_patient.items() if len(ls) > 1]
    if mixed:
        # allowed (a patient may have lesional and normal biopsies), but worth knowing
        logger.warning("%s: patients with slides of both labels: %s", manifest, mixed[:5])
    return records


def write_manifest(path: str | Path, records: list[SlideRecord]) -> None:
    """Write records as a manifest CSV (atomically), paths relative to the manifest's folder when possible."""
    path = Path(path)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "patient_id", "path", "label", "mpp"])
    for r in records:
        p = Path(r.path)
        try:
            p = p.resolve().relative_to(path.parent.resolve())
        except ValueError:
            pass
        w.writerow([r.slide_id, r.patient_id, str(p), r.label, "" if r.mpp is None else r.mpp])
    atomic_write_bytes(path, buf.getvalue().encode())
