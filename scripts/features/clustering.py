"""Phenotype clusters: seeded K-means on one scale's features, per slide (paper: k = 8)."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans
from tqdm import tqdm

from scripts.cache import atomic_save_npy, atomic_write_json
from scripts.features.store import FeatureEntry
from scripts.interrupts import check_stop

logger = logging.getLogger(__name__)


def kmeans_clusters(features: np.ndarray, k: int = 8, seed: int = 0) -> np.ndarray:
    """Cluster ids [N] of features [N, D]; with fewer than ``k`` patches every patch is its own cluster."""
    n = len(features)
    if n <= k:
        return np.arange(n, dtype=np.int64)
    km = KMeans(n_clusters=k, random_state=seed, n_init=10)
    return km.fit_predict(np.asarray(features, dtype=np.float32)).astype(np.int64)


def cluster_cohort(
    entries: Sequence[FeatureEntry], k: int = 8, scale_index: int = 0, seed: int = 0, progress: bool = True
) -> list[FeatureEntry]:
    """Write ``clusters.npy`` into every entry whose clustering parameters differ (cached otherwise)."""
    params = {"method": "kmeans", "k": int(k), "scale_index": int(scale_index), "seed": int(seed), "level": "slide"}
    todo = [e for e in entries if e.cluster_params() != params or e.clusters() is None]
    for e in tqdm(todo, desc="cluster slides", disable=not progress or not todo):
        check_stop()
        feats = e.features()
        if not 0 <= scale_index < feats.shape[1]:
            raise ValueError(f"cluster_scale_index {scale_index} out of range for {feats.shape[1]} scales")
        labels = kmeans_clusters(feats[:, scale_index], k, seed)
        atomic_save_npy(e.path / "clusters.npy", labels)
        atomic_write_json(e.path / "clusters.json", params)
    if todo:
        logger.info("clustered %d slides (k=%d on scale %d)", len(todo), k, scale_index)
    return list(entries)
