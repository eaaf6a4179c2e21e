"""The protocol's report for K > 2 classes: macro and per-class one-vs-rest AUC, balanced accuracy, confusion matrix,
quadratic weighted kappa for ordinal classes (scikit-learn), patient-level bootstrap CIs and the paired bootstrap of
macro AUC against the reference model (DeLong's test is for two classes)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, confusion_matrix

from scripts.evaluation import stats
from scripts.evaluation.report import (against_reference, bootstrap_table, envelope, environment_lines, localisation_table, mean_localisation,
                                       pooled_scores, recipe_text, selection_text)


def macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes present in ``y`` (``p`` [n, K]; sklearn's macro OvR when all are
    present); NaN with fewer than two classes."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([stats.auc_score((y == c).astype(int), p[:, c]) for c in present]))


def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Mean recall over the classes present, predicting the most probable class."""
    return float(balanced_accuracy_score(np.asarray(y).astype(int), np.asarray(p).argmax(1)))


def kappa(y: np.ndarray, p: np.ndarray) -> float:
    """Quadratic weighted kappa of the most probable class (ordinal classes)."""
    y, pred = np.asarray(y).astype(int), np.asarray(p).argmax(1)
    return float(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(np.asarray(p).shape[1]))))


def multiclass_metrics(y: np.ndarray, p: np.ndarray, class_names: Sequence[str], ordinal: bool = False) -> dict:
    """Macro and per-class AUC, accuracy, balanced accuracy, confusion matrix (rows true, columns predicted) and,
    for ordinal classes, the quadratic weighted kappa."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    k = p.shape[1]
    out = {
        "n": int(len(y)),
        "per_class_n": {class_names[c]: int((y == c).sum()) for c in range(k)},
        "macro_auc": macro_auc(y, p),
        "per_class_auc": {class_names[c]: (stats.auc_score((y == c).astype(int), p[:, c]) if 0 < (y == c).sum() < len(y) else float("nan"))
                          for c in range(k)},
        "accuracy": float(accuracy_score(y, p.argmax(1))),
        "balanced_accuracy": balanced_accuracy(y, p),
        "confusion": confusion_matrix(y, p.argmax(1), labels=list(range(k))).tolist(),
    }
    if ordinal:
        out["quadratic_kappa"] = kappa(y, p)
    return out


def _spread(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    return (float("nan"), float("nan")) if not len(v) else (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def build_multiclass_report(result: dict, reference: str, class_names: Sequence[str], ordinal: bool = False, n_resamples: int = 2000,
                            seed: int = 0, by_patient: bool = True, protocol: dict | None = None) -> dict:
    """Per model: per-split macro AUC / balanced accuracy (mean ± sd), the combined predictions' metrics with
    bootstrap CIs; paired bootstrap of macro AUC, reference minus each model."""
    names = list(class_names)
    labels = {i: s["label"] for i, s in result["slides"].items()}
    metric_fns = {"macro_auc": macro_auc, "balanced_accuracy": balanced_accuracy, **({"quadratic_kappa": kappa} if ordinal else {})}
    models, combined = {}, {}
    for name, runs in result["runs"].items():
        per_split = []
        for r in runs:
            ids = list(r["test"])
            y, p = np.asarray([labels[i] for i in ids]), np.asarray([r["test"][i] for i in ids], dtype=float)
            per_split.append({k: f(y, p) for k, f in metric_fns.items()} | {"best_epoch": (r.get("best") or {}).get("epoch")})
        ids, p = pooled_scores(result, name)
        y = np.asarray([labels[i] for i in ids])
        groups = [result["slides"][i]["patient_id"] for i in ids] if by_patient else None
        combined[name] = (ids, y, p, groups)
        spread = {k: _spread([s[k] for s in per_split]) for k in metric_fns}
        models[name] = {
            "per_split": per_split,
            "mean": {k: v[0] for k, v in spread.items()},
            "sd": {k: v[1] for k, v in spread.items()},
            "combined": multiclass_metrics(y, p, names, ordinal),
            "ci95": {k: stats.bootstrap_ci(y, p, f, n_resamples, seed, groups=groups) for k, f in metric_fns.items()} if len(set(y)) > 1 else {},
            "predictions": {i: [float(x) for x in v] for i, v in zip(ids, p)},
        }
        if loc := mean_localisation(runs):
            models[name]["localisation"] = loc
    comparisons = {}
    if reference in combined and len(set(combined[reference][1])) > 1:
        _, y, p_ref, groups = combined[reference]
        comparisons = {name: {"bootstrap": stats.paired_bootstrap_test(y, p_ref, p, macro_auc, n_resamples, seed, groups)}
                       for name, p in against_reference({n: (c[0], c[2]) for n, c in combined.items()}, reference).items()}
    return envelope(result, reference, n_resamples, seed, by_patient, protocol, models, comparisons, task="classification",
                    classes=names, ordinal=bool(ordinal))


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci(m: dict, key: str) -> str:
    c = m["ci95"].get(key)
    return "n/a" if not c else f"{_f(c['estimate'])} [{_f(c['low'])}, {_f(c['high'])}]"


def render_multiclass(report: dict) -> str:
    """The multi-class report as Markdown."""
    p = report["protocol"]
    names, classes = list(report["models"]), p["classes"]
    kappa_col = p.get("ordinal")
    lines = ["# CS-MIL evaluation report: " + f"{len(classes)} classes ({', '.join(classes)})", "",
             f"Protocol: {p['num_splits']} patient-level splits stratified by class ({p['mode'].replace('_', ' ')}); every model trained "
             f"with the same splits and hyper-parameters{recipe_text(p)}, {selection_text(p)}. 'mean ± sd' is over splits; "
             f"'combined' pools the test predictions, with {p['bootstrap_resamples']} bootstrap resamples of {p['bootstrap_unit']}s for "
             "the 95% CIs. AUC is one-vs-rest; macro = the mean over classes.", "", *environment_lines(p),
             "## Models", "",
             "| model | macro AUC (mean ± sd) | macro AUC, combined [95% CI] | balanced accuracy, combined [95% CI] | accuracy | "
             + ("quadratic kappa [95% CI] | " if kappa_col else "") + " | ".join(f"AUC {c}" for c in classes) + " |",
             "|---" * (5 + bool(kappa_col) + len(classes)) + "|"]
    for n in names:
        m = report["models"][n]
        c = m["combined"]
        lines.append(f"| {n} | {_f(m['mean']['macro_auc'])} ± {_f(m['sd']['macro_auc'])} | {_ci(m, 'macro_auc')} | {_ci(m, 'balanced_accuracy')} | "
                     f"{_f(c['accuracy'])} | " + (f"{_ci(m, 'quadratic_kappa')} | " if kappa_col else "")
                     + " | ".join(_f(c["per_class_auc"][k]) for k in classes) + " |")
    lines.append("")
    lines += bootstrap_table(report, "macro_auc", "macro AUC")
    ref = report["models"].get(p["reference"])
    if ref:
        lines += [f"## Confusion matrix of {p['reference']} (combined; rows true, columns predicted)", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        lines += [f"| {classes[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(ref["combined"]["confusion"])]
        lines.append("")
    lines += localisation_table(report, "the true class's patch attention vs lesion masks, test slides of classes other than the first")
    return "\n".join(lines)
