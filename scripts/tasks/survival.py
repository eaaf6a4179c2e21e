"""Survival as a discrete-time model: the network's C logits are a distribution over C time bins (a softmax: the
probability that the event falls in each bin; the "PMF" form of Kvamme & Borgan 2019, with bins at quantiles of the
training event times as PORPOISE / CLAM-survival cut them).

Why this and not Cox: the Cox partial likelihood compares each event with everyone still at risk *in the batch*;
MIL batches are a few bags (4 here), so almost no pairs are comparable and the loss is noise, and under DDP each rank
sees another risk set. The discrete-time likelihood is a sum over slides: every bag contributes on its own, the bag
ensemble (mean of the bags' bin probabilities, :class:`scripts.workflows.engine.BagEnsembleInferer`) is again a
distribution. Model selection is on the validation concordance index (``selection_metric``
in configs/train.yaml), the task's key metric: the likelihood also rewards calibration, and its minimum often falls
in the first epochs, before the ranking is learnt (docs/evaluation.md "Beyond binary").

Loss of a slide with time ``t`` in bin ``k``: ``-log p_k`` when the event was observed, ``-log sum_{j >= k} p_j``
(event after the start of bin ``k``) when censored. Risk (higher = earlier event): ``1 - E[bin] / (C - 1)`` in
[0, 1]. The statistics (Harrell's concordance, Kaplan-Meier, log-rank) are lifelines'.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from scripts.errors import BundleInputError


def time_cuts(times: Sequence[float], events: Sequence[int], num_bins: int = 4, where: str | None = None) -> list[float]:
    """``num_bins - 1`` inner cut points: quantiles of the observed event times (censored slides excluded)."""
    t, e = np.asarray(times, float), np.asarray(events, int)
    if not (e == 1).any():
        raise BundleInputError(where, "no slide of the training data has an event (every 'event' is 0)",
                               "survival needs observed events: check the manifest's 'event' column (1 = event, 0 = censored)")
    q = np.quantile(t[e == 1], np.linspace(0, 1, int(num_bins) + 1)[1:-1])
    return [float(x) for x in q]


def entry_cuts(entries: Sequence, num_bins: int, where: str | None = None) -> list[float]:
    """:func:`time_cuts` of feature entries (their manifest records' ``time`` / ``event``)."""
    return time_cuts([e.record.time for e in entries], [e.record.event for e in entries], num_bins, where)


def time_bins(time: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Bin index of each time (``cuts`` ascending: bin k holds ``cuts[k-1] <= t < cuts[k]``)."""
    return torch.bucketize(time.contiguous(), cuts.to(time.dtype), right=True)


class DiscreteTimeNLL(nn.Module):
    """Negative log-likelihood of ``target`` [B, 2] (time, event) under the bin distribution ``softmax(pred)`` [B, C]
    (``pred``: logits, or log-probabilities such as the bag ensemble's: log_softmax leaves those unchanged)."""

    def __init__(self, cuts: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("cuts", torch.as_tensor(list(cuts), dtype=torch.float32))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(pred.float(), dim=-1)
        k = time_bins(target[:, 0].float(), self.cuts).clamp_max(logp.shape[-1] - 1)
        event = target[:, 1].float()
        observed = logp.gather(1, k[:, None]).squeeze(1)
        later = torch.arange(logp.shape[-1], device=logp.device)[None] >= k[:, None]
        censored = torch.logsumexp(logp.masked_fill(~later, float("-inf")), dim=1)
        return -(event * observed + (1 - event) * censored).mean()


def risk(probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Risk of bin distributions [..., C]: ``1 - E[bin] / (C - 1)`` (1 = event in the first bin)."""
    p = np.asarray(probs, dtype=float)
    c = p.shape[-1]
    return 1.0 - (p * np.arange(c)).sum(-1) / max(c - 1, 1)


def concordance(time: Sequence[float], event: Sequence[int], risk_score: Sequence[float]) -> float:
    """Harrell's concordance index of ``risk_score`` (higher = earlier event; lifelines), NaN without events."""
    from lifelines.utils import concordance_index

    t, e, r = np.asarray(time, float), np.asarray(event, int), np.asarray(risk_score, float)
    if len(t) < 2 or not e.any():
        return float("nan")
    try:
        return float(concordance_index(t, -r, e))
    except ZeroDivisionError:  # events, but no comparable pair (e.g. every slide left at one time)
        return float("nan")


def concordance_counts(time: Sequence[float], event: Sequence[int], risk_score: Sequence[float]) -> tuple[float, int]:
    """Harrell's pairs of one group: (concordant pairs + half the pairs with tied risks, comparable pairs).

    Comparable, as lifelines counts them: an event at ``t_i`` against any slide that left later (``t_j > t_i``) or was
    censored at the same time; two events at one time are not compared. Concordant: the earlier event has the higher
    risk. ``concordant / comparable`` equals lifelines' ``concordance_index`` (tests/test_tasks.py checks it). Written
    here because lifelines' public API returns only that ratio, and pooling groups (:func:`stratified_concordance`)
    needs the counts; scikit-survival's ``concordance_index_censored`` returns them but would add a dependency for
    one function. Pairs are counted in blocks of events of at most 2^24 pairs (O(n^2) time, bounded memory).
    """
    t, e, r = np.asarray(time, float), np.asarray(event, int).astype(bool), np.asarray(risk_score, float)
    good, pairs = 0.0, 0
    died = np.flatnonzero(e)
    chunk = max(1, (1 << 24) // max(len(t), 1))
    for start in range(0, len(died), chunk):
        i = died[start:start + chunk]
        comparable = (t[None, :] > t[i, None]) | ((t[None, :] == t[i, None]) & ~e[None, :])
        pairs += int(comparable.sum())
        good += float(((r[i, None] > r[None, :]) & comparable).sum()) + 0.5 * float(((r[i, None] == r[None, :]) & comparable).sum())
    return good, pairs


def stratified_concordance(time: Sequence[float], event: Sequence[int], risk_score: Sequence[float],
                           strata: Sequence | None = None) -> float:
    """Harrell's concordance over the pairs *within* each stratum (NaN without a comparable pair).

    The protocol's out-of-fold survival predictions come from one model per split, and the risks of models trained on
    different splits are on different scales (their time bins and calibration differ), so a pair of slides scored by
    two models says how the models agree, not whether either ranks the patients. With the split as the stratum the
    c-index counts only pairs one model scored; with one stratum (``strata=None``) it is Harrell's C (lifelines')."""
    t, e, r = np.asarray(time, float), np.asarray(event, int), np.asarray(risk_score, float)
    s = np.zeros(len(t), int) if strata is None else np.unique(np.asarray(strata), return_inverse=True)[1].ravel()
    good, pairs = 0.0, 0
    for k in np.unique(s):
        g, n = concordance_counts(t[s == k], e[s == k], r[s == k])
        good, pairs = good + g, pairs + n
    return good / pairs if pairs else float("nan")


def _cindex(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    y = y.cpu().numpy()
    return concordance(y[:, 0], y[:, 1].astype(int), risk(torch.softmax(y_pred.float(), -1).cpu().numpy()))


def cindex_metric():
    """Validation concordance index as an ignite ``EpochMetric`` on (bag-ensemble log-probabilities, (time, event))."""
    from ignite.metrics import EpochMetric

    return EpochMetric(_cindex, output_transform=lambda o: (o["pred"], o["label"]), check_compute_fn=False)
