"""Bags drawn evenly from phenotype clusters.

A bag holds ``num_clusters`` x ``per_cluster`` slots laid out cluster-major (slot ``k * per_cluster + j``
belongs to cluster ``k``), so networks can pool inside clusters and then across them. Slots a cluster
cannot fill (empty or small clusters, sampling without replacement) are masked out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from scripts.cache import stable_hash
from scripts.errors import BundleInputError
from scripts.features.stain_views import StainViews, load_views
from scripts.features.store import FeatureEntry


def sample_bag(
    clusters: np.ndarray, num_clusters: int, per_cluster: int, rng: np.random.Generator, replacement: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Patch indices [K*M] (-1 where empty) and mask [K*M] of one bag."""
    idx = np.full(num_clusters * per_cluster, -1, dtype=np.int64)
    for k in range(num_clusters):
        members = np.flatnonzero(clusters == k)
        if len(members) == 0:
            continue
        if replacement:
            pick = rng.choice(members, size=per_cluster, replace=True)
        else:
            pick = rng.permutation(members)[:per_cluster]
        idx[k * per_cluster : k * per_cluster + len(pick)] = pick
    return idx, idx >= 0


def slide_bags(
    clusters: np.ndarray, slide_id: str, num_clusters: int, per_cluster: int, num_bags: int, replacement: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The fixed evaluation bags of one slide: indices [R, K*M] and mask [R, K*M].

    The one bag ensemble of the bundle (validation, inference, the evaluation protocol, the Deploy app): bags
    are a pure function of ``(seed, slide id)``, so a slide gets the same bags whatever else is in the run.
    """
    rng = np.random.default_rng([int(seed), int(stable_hash(slide_id, 8), 16)])
    bags = [sample_bag(clusters, num_clusters, per_cluster, rng, replacement) for _ in range(int(num_bags))]
    return np.stack([i for i, _ in bags]), np.stack([m for _, m in bags])


def gather_bag(features: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """[S, K*M, D] float32 features of a bag (zeros in masked slots)."""
    s, d = features.shape[1], features.shape[2]
    out = np.zeros((len(idx), s, d), np.float32)
    valid = idx >= 0
    out[valid] = features[idx[valid]]
    return torch.from_numpy(out).permute(1, 0, 2).contiguous()


def feature_stats(entries: Sequence[FeatureEntry], max_per_slide: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over all scales and (a seeded sample of) the patches of ``entries``."""
    rng = np.random.default_rng(seed)
    rows = []
    for e in entries:
        f = e.features()
        idx = np.sort(rng.choice(len(f), size=min(len(f), max_per_slide), replace=False))
        rows.append(np.asarray(f[idx], dtype=np.float32).reshape(-1, f.shape[-1]))
    x = np.concatenate(rows)
    return torch.from_numpy(x.mean(0)), torch.from_numpy(x.std(0))


def slide_target(entry: FeatureEntry, task: str = "classification") -> torch.Tensor:
    """The training target of a slide from its manifest record: the class index (``classification``), or float
    ``(time, event)`` (``survival``, :class:`scripts.tasks.survival.DiscreteTimeNLL`)."""
    r = entry.record
    if task == "survival":
        if r is None or r.time is None or r.event is None:
            raise BundleInputError(entry.path, f"slide '{entry.slide_id}' has no time / event", "survival needs the manifest's 'time' and 'event' columns")
        return torch.tensor([float(r.time), float(r.event)], dtype=torch.float32)
    return torch.tensor(int(entry.label))


class _SlideCache:
    """Features loaded once per slide (float16 in RAM; the demo and typical cohorts fit)."""

    def __init__(self, entries: Sequence[FeatureEntry], task: str = "classification") -> None:
        self.entries = list(entries)
        self.features = [np.asarray(e.features(mmap=False)) for e in self.entries]
        for e, f in zip(self.entries, self.features):
            if not np.isfinite(f).all():
                raise BundleInputError(e.path, "feature entry holds NaN/Inf values",
                                       "delete this entry and extract again (check the encoder weights)")
        self.clusters = []
        for e in self.entries:
            c = e.clusters()
            if c is None:
                raise ValueError(f"{e.path}: no clusters.npy; run the cluster stage first")
            self.clusters.append(c)
        if any(e.label is None for e in self.entries):
            raise ValueError("bag datasets need entries with their manifest record (labels never come from the cache)")
        self.labels = [slide_target(e, task) for e in self.entries]


class BagDataset(Dataset):
    """Training bags: ``bags_per_slide`` random bags per slide per epoch.

    Items: ``{"image": [S, K*M, D], "mask": [K*M] bool, "label": target, "slide_index": int}`` (target:
    :func:`slide_target` of ``task``).
    Bags differ between epochs and are reproducible for a seed (the random stream is advanced by the
    DataLoader order, which MONAI's ``set_determinism`` seeds). With ``stain_views``
    (:mod:`scripts.features.stain_views`) each bag takes its features from the slide's original features or one of
    its V stain views, uniformly at random (held in RAM: V + 1 times the features).
    """

    def __init__(
        self,
        entries: Sequence[FeatureEntry],
        num_clusters: int = 8,
        per_cluster: int = 8,
        bags_per_slide: int = 4,
        replacement: bool = False,
        seed: int = 0,
        task: str = "classification",
        balance_classes: bool = False,
        stain_views: StainViews | None = None,
    ) -> None:
        self.cache = _SlideCache(entries, task)
        self.views = [load_views(e, stain_views) for e in self.cache.entries] if stain_views is not None else None
        self.k, self.m, self.r = num_clusters, per_cluster, bags_per_slide
        self.index = balanced_index(self.cache.labels, bags_per_slide, seed) if balance_classes and task == "classification" else None
        self.replacement = replacement
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.cache.entries) * self.r if self.index is None else len(self.index)

    def __getitem__(self, i: int) -> dict:
        si = i // self.r if self.index is None else int(self.index[i])
        idx, mask = sample_bag(self.cache.clusters[si], self.k, self.m, self.rng, self.replacement)
        features = self.cache.features[si]
        if self.views is not None:  # 0: the original features, v >= 1: stain view v
            v = int(self.rng.integers(len(self.views[si]) + 1))
            features = features if v == 0 else self.views[si][v - 1]
        return {
            "image": gather_bag(features, idx),
            "mask": torch.from_numpy(mask),
            "label": self.cache.labels[si],
            "slide_index": si,
        }


def balanced_index(labels: Sequence[torch.Tensor], bags_per_slide: int, seed: int = 0) -> np.ndarray:
    """Slide index of each training bag of an epoch with every class drawing the same number of bags: the largest
    class's ``slides x bags_per_slide``, spread evenly over each class's slides (a class of 3 slides beside one of 9
    gives each of its slides 3x the bags). Deterministic for ``seed``; bag contents stay random per epoch."""
    y = np.asarray([int(t) for t in labels])
    per_class = {c: np.flatnonzero(y == c) for c in np.unique(y)}
    total = max(len(v) for v in per_class.values()) * int(bags_per_slide)
    rng = np.random.default_rng([int(seed), 7])
    out = []
    for c, slides in per_class.items():
        reps = np.resize(rng.permutation(slides), total)  # each slide ceil/floor(total / n) times
        out.append(np.sort(reps))
    return np.concatenate(out)


class SlideBagsDataset(Dataset):
    """Evaluation: one item per slide holding its ``num_bags`` fixed bags (:func:`slide_bags`): image
    [R, S, K*M, D], mask [R, K*M]."""

    def __init__(
        self,
        entries: Sequence[FeatureEntry],
        num_clusters: int = 8,
        per_cluster: int = 8,
        num_bags: int = 10,
        replacement: bool = False,
        seed: int = 0,
        task: str = "classification",
    ) -> None:
        self.cache = _SlideCache(entries, task)
        self.k, self.m, self.r = num_clusters, per_cluster, num_bags
        self.replacement, self.seed = replacement, seed

    def __len__(self) -> int:
        return len(self.cache.entries)

    def __getitem__(self, si: int) -> dict:
        idx, mask = slide_bags(self.cache.clusters[si], self.cache.entries[si].slide_id, self.k, self.m, self.r,
                               self.replacement, self.seed)
        return {
            "image": torch.stack([gather_bag(self.cache.features[si], i) for i in idx]),
            "mask": torch.from_numpy(mask),
            "label": self.cache.labels[si],
            "slide_index": si,
        }
