"""Manifest CSV: ``slide_id, patient_id, path, label`` (+ optional ``mpp``, ``split``); for ``task: survival``
``slide_id, patient_id, path, time, event`` (``label`` optional).

Manifests are data: they are parsed, validated and never evaluated. ``path`` is absolute or relative to
the manifest's folder; ``label`` is a class name (or index) mapped through ``label_map`` (two or more classes);
``time`` is the follow-up time (>= 0, any unit) and ``event`` 1 (event) or 0 (censored). For survival the record's
``label`` is the event (splits are stratified by it). Ids are data, never paths
(:mod:`scripts.data.ids`). Encodings: UTF-8 with or without BOM, UTF-16 with BOM, else Windows-1252 with a warning.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from scripts.cache import atomic_write_bytes
from scripts.data.ids import folder_name
from scripts.errors import BundleInputError
from scripts.wsi.formats import dicom_folder, is_slide, slide_path

logger = logging.getLogger(__name__)

#: sane range of level-0 resolutions (µm per px); outside it the metadata is wrong or the file is no slide
MPP_RANGE = (0.05, 20.0)
REQUIRED = ("slide_id", "patient_id", "path", "label")
#: the columns of a survival manifest besides slide_id, patient_id and path
SURVIVAL_COLUMNS = ("time", "event")


@dataclass(frozen=True)
class SlideRecord:
    """One slide of a cohort."""

    slide_id: str
    patient_id: str
    path: str
    label: int
    mpp: float | None = None
    split: str | None = None
    time: float | None = None
    event: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


#: values of the optional ``split`` column (``valid`` and ``validation`` are read as ``val``)
SPLITS = ("train", "val", "valid", "validation", "test")


def read_manifest(
    manifest: str | Path, label_map: Mapping[str, int] | None = None, check_paths: bool = True,
    require_labels: bool = True, task: str = "classification",
) -> list[SlideRecord]:
    """Parse and validate a manifest; every problem names its row and the fix.

    With ``require_labels=False`` (inference) the ``label`` column (``time`` / ``event`` for survival) may be absent
    or empty (label -1). ``task="survival"`` reads ``time`` and ``event`` instead of ``label``.
    """
    survival = task == "survival"
    manifest = Path(manifest)
    if manifest.is_dir():
        raise BundleInputError(manifest, "is a folder, not a manifest file",
                               "pass the folder as --dataset_dir (it must hold manifest.csv), or pass the CSV file itself as --manifest")
    if not manifest.is_file():
        raise BundleInputError(manifest, "manifest not found", "pass --dataset_dir pointing at a folder with manifest.csv, or --manifest")
    label_map = {str(k): int(v) for k, v in (label_map or {"0": 0, "1": 1}).items()}
    reader = csv.DictReader(io.StringIO(manifest_text(manifest), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    required = [c for c in REQUIRED if not survival or c != "label"] + (list(SURVIVAL_COLUMNS) if survival else [])
    missing = [c for c in required if c not in header and (require_labels or c not in ("label", *SURVIVAL_COLUMNS))]
    if missing:
        hint = " (--task survival reads 'time' and 'event')" if survival else ""
        raise BundleInputError(manifest, f"missing column(s) {missing} (found {header}){hint}", f"the header must contain {required}")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    if not rows:
        raise BundleInputError(manifest, "manifest has no rows", "add one row per slide")
    records, seen, files, folders = [], {}, {}, {}
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{manifest}:{i}"
        sid, pid = row["slide_id"], row["patient_id"]
        if not sid:
            raise BundleInputError(where, "empty slide_id", "give every slide a unique id")
        if not pid:
            raise BundleInputError(where, f"empty patient_id for slide '{sid}'", "give every slide its patient's id (splits are by patient)")
        if sid in seen:
            raise BundleInputError(where, f"duplicate slide_id '{sid}' (first at row {seen[sid]})", "make slide ids unique")
        folded = folder_name(sid).casefold()
        if folded in folders:
            raise BundleInputError(where, f"slide_id '{sid}' differs from row {folders[folded]}'s only in letter case: both would share a "
                                   "folder on case-insensitive file systems (macOS, Windows)", "make slide ids differ by more than case")
        seen[sid], folders[folded] = i, i
        time = event = None
        if survival:
            time, event = _survival_values(row, where, sid, require_labels)
            label = -1 if event is None else event
        elif not require_labels and not row.get("label"):
            label = -1
        elif row["label"] not in label_map:
            raise BundleInputError(where, f"unknown label '{row['label']}' for slide '{sid}'", f"use one of {sorted(label_map)} or extend 'label_map' in the config")
        else:
            label = label_map[row["label"]]
        path = Path(row["path"])
        if not path.is_absolute():
            path = manifest.parent / path
        path = slide_path(path)  # a DICOM-WSI series: its folder, for any of its files
        if check_paths and path.is_dir() and dicom_folder(path) is None:
            raise BundleInputError(where, f"slide path '{path}' is a folder, not a slide file",
                                   "give the slide file's path (for MIRAX, the .mrxs file beside its folder; a DICOM-WSI folder holds .dcm files)")
        if check_paths and not is_slide(path):
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
            if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
                raise BundleInputError(where, f"mpp {row['mpp']} for slide '{sid}' is outside the plausible range {MPP_RANGE} µm per px",
                                       "write the slide's level-0 µm per px, e.g. 0.25 (40x) or 0.5 (20x), or leave it empty to use the slide's metadata")
        records.append(SlideRecord(sid, pid, str(path), label, mpp, split, time, event))
    if survival and require_labels and not any(r.event == 1 for r in records):
        raise BundleInputError(manifest, f"no slide has an event (all {len(records)} 'event' values are 0)",
                               "survival needs observed events: write 1 in 'event' for slides whose event was observed")
    labels_by_patient: dict[str, set[int]] = {}
    for r in records:
        labels_by_patient.setdefault(r.patient_id, set()).add(r.label)
    mixed = [p for p, ls in labels_by_patient.items() if len(ls) > 1]
    if mixed:
        # allowed (a patient may have lesional and normal biopsies), but worth knowing
        logger.warning("%s: patients with slides of both labels: %s", manifest, mixed[:5])
    return records


def _survival_values(row: dict, where: str, sid: str, required: bool) -> tuple[float | None, int | None]:
    """``time`` (>= 0) and ``event`` (0/1) of a manifest row (None, None when empty and not required)."""
    t, e = row.get("time", ""), row.get("event", "")
    if not required and not t and not e:
        return None, None
    try:
        time = float(t)
    except ValueError:
        raise BundleInputError(where, f"time '{t}' for slide '{sid}' is not a number", "write the follow-up time as a number (any unit, e.g. months)") from None
    if not math.isfinite(time) or time < 0:
        raise BundleInputError(where, f"time {t} for slide '{sid}' is negative or not finite", "write the time from diagnosis to event or censoring (>= 0)")
    if e not in ("0", "1"):
        raise BundleInputError(where, f"event '{e}' for slide '{sid}' is not 0 or 1", "write 1 when the event was observed, 0 when censored")
    return time, int(e)


def manifest_text(manifest: Path) -> str:
    """The manifest's text: UTF-8 (with or without BOM) or UTF-16 with a BOM; any other bytes are read as
    Windows-1252 (what Excel saves as "CSV" on Western Windows; Latin-1 where cp1252 has no character) with a
    warning naming the file, since both decode every byte and ids read that way are what the user typed."""
    data = manifest.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        try:
            text, encoding = data.decode("cp1252"), "Windows-1252"
        except UnicodeDecodeError:
            text, encoding = data.decode("latin-1"), "Latin-1"
        line = data[: err.start].count(b"\n") + 1
        logger.warning("%s: not UTF-8 (byte 0x%02x on line %d): read as %s. Save it as 'CSV UTF-8' to silence this",
                       manifest, data[err.start], line, encoding)
        return text


def write_manifest(path: str | Path, records: list[SlideRecord]) -> None:
    """Write records as a manifest CSV (atomically), paths relative to the manifest's folder when possible."""
    path = Path(path)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    survival = any(r.time is not None for r in records)
    w.writerow(["slide_id", "patient_id", "path", "label", "mpp"] + (list(SURVIVAL_COLUMNS) if survival else []))
    for r in records:
        p = Path(r.path)
        try:
            p = p.resolve().relative_to(path.parent.resolve())
        except ValueError:
            pass
        w.writerow([r.slide_id, r.patient_id, str(p), r.label, "" if r.mpp is None else r.mpp]
                   + ([f"{r.time:g}", r.event] if survival else []))
    atomic_write_bytes(path, buf.getvalue().encode())
