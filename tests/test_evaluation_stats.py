"""Metrics and statistics of the evaluation report against independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from scripts.evaluation import metrics, stats


def _data(n=40, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(int)
    p1 = np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    p2 = np.clip(0.5 + 0.10 * (y - 0.5) + rng.normal(0, 0.2, n) + 0.3 * (p1 - 0.5), 0, 1)
    if ties:
        p1, p2 = np.round(p1, 1), np.round(p2, 1)
    return y, p1, p2


def _brute_force_delong(y, p1, p2):
    """Structural components straight from the definition (DeLong et al., 1988), O(m n) loops."""
    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    v10 = np.array([[np.mean([psi(p[i], p[j]) for j in neg]) for i in pos] for p in (p1, p2)])
    v01 = np.array([[np.mean([psi(p[i], p[j]) for i in pos]) for j in neg] for p in (p1, p2)])
    auc = v10.mean(axis=1)
    s10 = np.array([[np.sum((v10[a] - auc[a]) * (v10[b] - auc[b])) / (m - 1) for b in range(2)] for a in range(2)])
    s01 = np.array([[np.sum((v01[a] - auc[a]) * (v01[b] - auc[b])) / (n - 1) for b in range(2)] for a in range(2)])
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (auc[0] - auc[1]) / np.sqrt(var)
    from math import erfc, sqrt

    return auc, cov, erfc(abs(z) / sqrt(2))  # two-tailed normal p without scipy


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_brute_force_structural_components(ties):
    y, p1, p2 = _data(30, seed=3, ties=ties)
    auc, cov = stats.delong(y, np.vstack([p1, p2]))
    bf_auc, bf_cov, bf_p = _brute_force_delong(y, p1, p2)
    np.testing.assert_allclose(auc, bf_auc, atol=1e-12)
    np.testing.assert_allclose(auc, [roc_auc_score(y, p1), roc_auc_score(y, p2)], atol=1e-12)
    np.testing.assert_allclose(cov, bf_cov, rtol=1e-10, atol=1e-14)
    t = stats.delong_test(y, p1, p2)
    assert t["p"] == pytest.approx(bf_p, rel=1e-9)
    assert 0 < t["p"] < 1


def test_delong_identical_predictions_give_p_one_and_clear_signal_a_small_p():
    y, p1, _ = _data(60)
    assert stats.delong_test(y, p1, p1)["p"] == 1.0
    rng = np.random.default_rng(1)
    strong, noise = y + rng.normal(0, 0.3, len(y)), rng.random(len(y))
    assert stats.delong_test(y, strong, noise)["p"] < 1e-3
    with pytest.raises(ValueError, match="both classes"):
        stats.delong(np.ones(5), np.arange(5.0))


def test_fast_auc_equals_sklearn_with_ties():
    for seed in range(5):
        y, p1, _ = _data(25, seed, ties=True)
        assert stats.auc_score(y, p1) == pytest.approx(roc_auc_score(y, p1), abs=1e-12)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    y, p1, p2 = _data(50)
    a = stats.bootstrap_ci(y, p1, stats.auc_score, n_resamples=500, seed=7)
    b = stats.bootstrap_ci(y, p1, stats.auc_score, n_resamples=500, seed=7)
    c = stats.bootstrap_ci(y, p1, stats.auc_score, n_resamples=500, seed=8)
    assert a == b and a != c
    assert a["low"] < a["estimate"] < a["high"] and a["n_resamples"] == 500
    # resampling patients (2 slides each) gives a wider interval than treating slides as independent
    groups = np.repeat(np.arange(25), 2)
    yy, pp = np.repeat(y[::2], 2), np.repeat(p1[::2], 2)
    wide = stats.bootstrap_ci(yy, pp, stats.auc_score, n_resamples=500, seed=0, groups=groups)
    narrow = stats.bootstrap_ci(yy, pp, stats.auc_score, n_resamples=500, seed=0)
    assert wide["high"] - wide["low"] > narrow["high"] - narrow["low"]


def test_paired_bootstrap_test():
    y, p1, _ = _data(60)
    same = stats.paired_bootstrap_test(y, p1, p1, stats.auc_score, n_resamples=300, seed=0)
    assert same["diff"] == 0 and same["p"] == 1.0
    rng = np.random.default_rng(2)
    res = stats.paired_bootstrap_test(y, y + rng.normal(0, 0.3, len(y)), rng.random(len(y)), stats.auc_score, n_resamples=300, seed=0)
    assert res["diff"] > 0.3 and res["p"] < 0.01 and res["low"] > 0
    again = stats.paired_bootstrap_test(y, y + np.random.default_rng(2).normal(0, 0.3, len(y)), np.random.default_rng(2).random(len(y)),
                                        stats.auc_score, n_resamples=300, seed=0)
    assert again["n_resamples"] == 300


def test_metrics_thresholds_and_calibration():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9])
    m = metrics.binary_metrics(y, p, threshold=metrics.youden_threshold(y, p))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["at_0.5"] == {"threshold": 0.5, "accuracy": pytest.approx(4 / 6), "balanced_accuracy": pytest.approx(4 / 6),
                           "sensitivity": pytest.approx(2 / 3), "specificity": pytest.approx(2 / 3)}
    assert m["at_val"]["balanced_accuracy"] >= m["at_0.5"]["balanced_accuracy"]
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    cal = metrics.calibration(y, p, n_bins=2)
    # bins [0, .5): p .1 .4 .35 -> observed 1/3, mean .2833; [.5, 1]: .6 .8 .9 -> 2/3, .7667
    np.testing.assert_allclose(cal["observed"], [1 / 3, 2 / 3])
    assert cal["ece"] == pytest.approx(0.5 * abs(1 / 3 - 0.85 / 3) + 0.5 * abs(2 / 3 - 2.3 / 3))
    assert metrics.youden_threshold(np.ones(3), np.arange(3.0)) == 0.5
    assert np.isnan(metrics.binary_metrics(np.ones(3), np.arange(3.0) / 3)["auc"])


def test_patient_grouped_resampling_keeps_patients_whole():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), [1, 2, 3, 4])
    for idx in stats._resample_indices(len(groups), groups, 20, rng):
        counts = {g: int(np.sum(groups[idx] == g)) for g in set(groups[idx].tolist())}
        assert all(c % (g + 1) == 0 for g, c in counts.items())
    assert list(itertools.islice(stats._resample_indices(5, None, 3, np.random.default_rng(0)), 3))[0].shape == (5,)
