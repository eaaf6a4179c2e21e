"""Feature-store cohorts written directly (store format of scripts/features/store.py) for fast protocol tests.

``cross_scale_cohort``: a slide is positive only when one location shows pattern ``u`` at the first scale
*and* pattern ``v`` at the last scale; every slide has the same number of ``u`` and ``v`` patches per scale,
so a single-scale model sees the same distribution for both classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scripts.data.manifest import SlideRecord
from scripts.features.store import FeatureEntry


def write_entry(root: Path, slide_id: str, patient_id: str, label: int, features: np.ndarray, clusters: np.ndarray) -> FeatureEntry:
    d = root / f"{slide_id}-entry"
    d.mkdir(parents=True)
    np.save(d / "features.npy", features.astype(np.float16))
    np.save(d / "coords.npy", np.stack([np.arange(len(features)) * 256.0, np.zeros(len(features))], 1))
    np.save(d / "clusters.npy", clusters.astype(np.int64))
    (d / "clusters.json").write_text(json.dumps({"k": int(clusters.max()) + 1}))
    (d / "meta.json").write_text(json.dumps({"slide_id": slide_id, "num_patches": len(features)}))
    return FeatureEntry(d, SlideRecord(slide_id, patient_id, f"{slide_id}.tif", int(label)))  # the manifest's row


def cross_scale_cohort(root: Path, num_patients: int = 24, slides_per_patient: int = 1, dim: int = 128, num_scales: int = 3,
                       patches: int = 64, marked: int = 6, strength: float = 2.5, seed: int = 0) -> list[FeatureEntry]:
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=dim), rng.normal(size=dim)
    u, v = strength * u / np.linalg.norm(u) * np.sqrt(dim) / 4, strength * v / np.linalg.norm(v) * np.sqrt(dim) / 4
    entries = []
    for p in range(num_patients):
        label = p % 2
        for s in range(slides_per_patient):
            f = rng.normal(size=(patches, num_scales, dim))
            idx = rng.permutation(patches)
            if label:  # marked locations: u&v, u only, v only
                both, u_only, v_only = idx[:marked], idx[marked:2 * marked], idx[2 * marked:3 * marked]
            else:  # twice as many u-only and v-only locations: same per-scale counts as a positive slide
                both, u_only, v_only = idx[:0], idx[: 2 * marked], idx[2 * marked:4 * marked]
            f[np.r_[both, u_only], 0] += u
            f[np.r_[both, v_only], -1] += v
            clusters = rng.integers(0, 8, patches)
            entries.append(write_entry(root, f"syn-p{p:03d}-s{s}", f"p{p:03d}", label, f, clusters))
    return entries
