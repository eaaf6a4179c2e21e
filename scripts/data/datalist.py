"""The datalist the stages hand on: one item per slide of the current manifest with where its features are.

``prepare -> extract -> cluster`` look every slide of the command's manifest up in the caches by its identity
(slide file fingerprint, tiling, encoders and preprocessing: the store's keys) and return
:class:`~scripts.features.store.FeatureEntry` objects that carry the manifest row
(:class:`~scripts.data.manifest.SlideRecord`). Training, evaluation and inference consume that list, so labels,
patient ids and splits always come from the manifest as it is now; a relabelled manifest needs no new
extraction. :func:`write_datalist` also writes it as ``<output_dir>/datalist.json`` (the Model Zoo's
datalist form, for other tools and for reading what a command used).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from scripts.cache import atomic_write_json
from scripts.data.manifest import SlideRecord
from scripts.features.store import FeatureEntry

logger = logging.getLogger(__name__)

DATALIST_FILE = "datalist.json"


def item(entry: FeatureEntry) -> dict:
    """One datalist item: the manifest's fields, the slide file (``image``) and the feature entry (``features``)."""
    r = entry.record
    if r is None:
        raise ValueError(f"{entry.path}: a feature entry without its manifest record has no datalist item")
    out = {"slide_id": r.slide_id, "patient_id": r.patient_id, "label": int(r.label), "image": str(r.path),
           "features": str(entry.path)}
    if r.split:
        out["split"] = r.split
    if r.mpp is not None:
        out["mpp"] = float(r.mpp)
    if r.time is not None:
        out["time"], out["event"] = float(r.time), int(r.event)
    return out


def write_datalist(entries: Sequence[FeatureEntry], output_dir: str | Path | None) -> list[FeatureEntry]:
    """Write ``<output_dir>/datalist.json`` (``{"slides": [items]}``, atomically) and return ``entries``."""
    if output_dir is not None:
        path = Path(output_dir) / DATALIST_FILE
        atomic_write_json(path, {"slides": [item(e) for e in entries]})
        logger.info("datalist: %d slides -> %s", len(entries), path)
    return list(entries)


def read_datalist(path: str | Path) -> list[FeatureEntry]:
    """Entries of a written datalist (records rebuilt from its items)."""
    items = json.loads(Path(path).read_text())["slides"]
    return [FeatureEntry(Path(i["features"]), SlideRecord(i["slide_id"], i["patient_id"], i["image"], int(i["label"]),
                                                          i.get("mpp"), i.get("split"), i.get("time"), i.get("event")))
            for i in items]
