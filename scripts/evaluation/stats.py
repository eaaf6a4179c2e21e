"""Uncertainty and paired comparisons of slide-level AUCs.

Written here because no maintained library covers them: scikit-learn has no DeLong test, and
``scipy.stats.bootstrap`` can neither resample by patient (slides of one patient are not independent) nor
skip resamples that hold a single class (AUC undefined).

* :func:`delong` - DeLong et al. (1988) AUC variance and covariance of correlated ROC curves, computed
  with the midrank algorithm of Sun & Xu (2014) (O(n log n)); :func:`delong_test` - paired two-tailed test.
* :func:`bootstrap_ci` - percentile bootstrap CI of any metric, seeded, optionally resampling patients.
* :func:`paired_bootstrap_test` - two-tailed paired bootstrap test of a metric difference.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.stats import norm, rankdata


def _midrank_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs [M], structural components V10 [M, m] (positives) and V01 [M, n] (negatives) for M score rows."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = rankdata(pos, axis=1)  # ranks within positives
    ty = rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    auc = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v10 = (tz[:, :m] - tx) / n  # fraction of negatives below each positive (ties count 1/2)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # fraction of positives above each negative
    return auc, v10, v01


def delong(y: Sequence[int], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [M] and their DeLong covariance matrix [M, M] for score rows ``scores`` [M, n] (or [n])."""
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    if len(np.unique(y)) < 2:
        raise ValueError("DeLong needs both classes in y")
    auc, v10, v01 = _midrank_components(y, scores)
    m, n = v10.shape[1], v01.shape[1]
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, cov


def delong_test(y: Sequence[int], p1: Sequence[float], p2: Sequence[float]) -> dict[str, float]:
    """Paired two-tailed DeLong test of AUC(p1) = AUC(p2) on the same slides."""
    auc, cov = delong(y, np.vstack([p1, p2]))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(auc[0] - auc[1])
    if var <= 0:  # identical rankings: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = diff / np.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    return {"auc_1": float(auc[0]), "auc_2": float(auc[1]), "diff": diff, "se": float(np.sqrt(max(var, 0.0))), "z": float(z), "p": p}


def _resample_indices(n: int, groups: Sequence | None, n_resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays of bootstrap resamples: slides with replacement, or whole groups (patients) with replacement."""
    if groups is None:
        return list(rng.integers(0, n, size=(n_resamples, n)))
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    picks = rng.integers(0, len(members), size=(n_resamples, len(members)))
    return [np.concatenate([members[j] for j in row]) for row in picks]


def bootstrap_distribution(
    y: Sequence[int], preds: Sequence[np.ndarray], metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 2000, seed: int = 0, groups: Sequence | None = None,
) -> np.ndarray:
    """Metric of each prediction vector on the same resamples: [n_valid, len(preds)]; resamples holding a
    single class are skipped (and replaced, so ``n_valid == n_resamples`` unless the data has one class)."""
    y = np.asarray(y).astype(int)
    preds = [np.asarray(p, dtype=float) for p in preds]
    if len(np.unique(y)) < 2:
        raise ValueError("bootstrap of a ranking metric needs both classes in y")
    rng = np.random.default_rng(seed)
    out: list[list[float]] = []
    while len(out) < n_resamples:
        for idx in _resample_indices(len(y), groups, n_resamples - len(out), rng):
            if y[idx].min() == y[idx].max():
                continue
            out.append([metric(y[idx], p[idx]) for p in preds])
    return np.asarray(out)


def bootstrap_ci(
    y: Sequence[int], p: Sequence[float], metric: Callable[[np.ndarray, np.ndarray], float], n_resamples: int = 2000,
    seed: int = 0, alpha: float = 0.05, groups: Sequence | None = None,
) -> dict[str, float]:
    """Point estimate and percentile bootstrap ``1 - alpha`` CI of ``metric(y, p)``."""
    dist = bootstrap_distribution(y, [p], metric, n_resamples, seed, groups)[:, 0]
    lo, hi = np.quantile(dist, [alpha / 2, 1 - alpha / 2])
    return {"estimate": float(metric(np.asarray(y), np.asarray(p, dtype=float))), "low": float(lo), "high": float(hi),
            "n_resamples": int(len(dist))}


def paired_bootstrap_test(
    y: Sequence[int], p1: Sequence[float], p2: Sequence[float], metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 2000, seed: int = 0, groups: Sequence | None = None,
) -> dict[str, float]:
    """Two-tailed paired bootstrap test of ``metric(p1) - metric(p2)``.

    Both models are scored on the same resamples; the null distribution is the resampled difference
    centred on the observed one, and ``p = (1 + #{|d* - d| >= |d|}) / (1 + B)``.
    """
    y_arr = np.asarray(y).astype(int)
    observed = float(metric(y_arr, np.asarray(p1, dtype=float)) - metric(y_arr, np.asarray(p2, dtype=float)))
    dist = bootstrap_distribution(y, [p1, p2], metric, n_resamples, seed, groups)
    return paired_summary(observed, dist[:, 0] - dist[:, 1])


def paired_summary(observed: float, d: np.ndarray) -> dict[str, float]:
    """Two-tailed p-value and 95% percentile CI of a paired difference ``observed`` from its resampled values ``d``
    (the null distribution is ``d`` centred on ``observed``: ``p = (1 + #{|d* - d| >= |d|}) / (1 + B)``)."""
    d = np.asarray(d, dtype=float)
    extreme = int(np.sum(np.abs(d - observed) >= abs(observed) - 1e-12))
    lo, hi = np.quantile(d, [0.025, 0.975])
    return {"diff": float(observed), "p": (1 + extreme) / (1 + len(d)), "low": float(lo), "high": float(hi), "n_resamples": int(len(d))}


def auc_score(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by midranks (Mann-Whitney U; equals ``sklearn.metrics.roc_auc_score``, ~10x faster on small
    arrays, which matters inside 2,000 bootstrap resamples)."""
    return float(_midrank_components(np.asarray(y).astype(int), np.asarray(p, dtype=float)[None])[0][0])
