"""Per-slide feature store: one directory per slide, reused by every stage and command.

Each directory is named ``<folder name of the slide id>-<hash of provenance>`` (:mod:`scripts.data.ids`)::

    features.npy   float16 [N, S, D], read memory-mapped
    coords.npy     int64 [N, 2] level-0 patch centres (x, y)
    meta.json      provenance: tiles entry, encoder weights hash, preprocessing, package versions (no label:
                   labels, patient ids and splits come from the manifest of the command, see
                   :mod:`scripts.data.datalist`)
    clusters.npy   int64 [N] phenotype cluster per patch (written by the cluster stage)
    clusters.json  the clustering parameters that produced clusters.npy

Entries are written under a temporary name and renamed (see :mod:`scripts.cache`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from scripts.data.manifest import SlideRecord


@dataclass(frozen=True)
class FeatureEntry:
    """Read access to one slide's store entry, with the manifest ``record`` it was looked up for.

    The entry holds what the slide's features are (provenance); who the slide belongs to and its label come from
    ``record``, the current manifest's row, never from the cache: a corrected manifest takes effect at once.
    """

    path: Path
    record: SlideRecord | None = None

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    @property
    def slide_id(self) -> str:
        return self.record.slide_id if self.record is not None else self.meta["slide_id"]

    @property
    def patient_id(self) -> str | None:
        """The manifest's patient id (None for an entry looked up without a record)."""
        return self.record.patient_id if self.record is not None else None

    @property
    def label(self) -> int | None:
        """The manifest's label (-1 for an unlabelled slide; None for an entry looked up without a record)."""
        return None if self.record is None else int(self.record.label)

    @property
    def split(self) -> str | None:
        """The manifest's ``split`` value, if any."""
        return self.record.split if self.record is not None else None

    def features(self, mmap: bool = True) -> np.ndarray:
        """float16 [N, S, D] (memory-mapped unless ``mmap=False``)."""
        return np.load(self.path / "features.npy", mmap_mode="r" if mmap else None)

    def coords(self) -> np.ndarray:
        return np.load(self.path / "coords.npy")

    def clusters(self) -> np.ndarray | None:
        p = self.path / "clusters.npy"
        return np.load(p) if p.is_file() else None

    def cluster_params(self) -> dict | None:
        p = self.path / "clusters.json"
        return json.loads(p.read_text()) if p.is_file() else None

    @property
    def num_patches(self) -> int:
        return int(self.meta["num_patches"])


def is_complete(entry_dir: Path) -> bool:
    """An entry exists only once it was renamed into place; meta.json is written last inside it."""
    return (entry_dir / "meta.json").is_file() and (entry_dir / "features.npy").is_file()
