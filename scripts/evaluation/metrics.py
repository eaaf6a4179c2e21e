"""Slide-level classification metrics (scikit-learn) for a positive-class probability ``p`` and 0/1 labels."""

from __future__ import annotations

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (Youden's J) on ``(y, p)``, e.g. validation slides.

    Returns 0.5 when ``y`` has a single class (no ROC curve)."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], 1.0))  # roc_curve's first threshold is +inf


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, sensitivity and specificity when calling ``p >= threshold`` positive
    (``threshold`` may hold one value per slide, e.g. each split's own; the mean is reported)."""
    y = np.asarray(y).astype(int)
    pred = (np.asarray(p, dtype=float) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "threshold": float(np.mean(threshold)),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else float("nan"),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
    }


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUC, AP, Brier score and the :func:`threshold_metrics` at 0.5 (``at_0.5``) and at ``threshold`` (``at_val``,
    e.g. the validation-chosen Youden threshold). AUC and AP are NaN when ``y`` has one class."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    both = len(np.unique(y)) > 1
    out: dict = {
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "ap": float(average_precision_score(y, p)) if both else float("nan"),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "at_0.5": threshold_metrics(y, p, 0.5),
    }
    out["accuracy"] = out["at_0.5"]["accuracy"]
    if threshold is not None:
        out["at_val"] = threshold_metrics(y, p, threshold)
    return out


def calibration(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, list[float] | float]:
    """Reliability curve (sklearn ``calibration_curve``, uniform bins) and the expected calibration error
    (bin-size-weighted mean |observed rate - mean predicted probability|)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], p)  # sklearn's binning
    counts = np.bincount(bins, minlength=n_bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts / len(p) * np.abs(frac_pos - mean_pred))) if len(p) else float("nan")
    return {"observed": frac_pos.tolist(), "predicted": mean_pred.tolist(), "counts": counts.tolist(), "ece": ece}
