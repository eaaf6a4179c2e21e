"""From the protocol's predictions to ``report.json`` and ``report.md`` (tables laid out as the paper's)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from scripts.cache import atomic_write_bytes, atomic_write_json
from scripts.evaluation import metrics, stats
from scripts.mil.registry import FIELD_HEADS

logger = logging.getLogger(__name__)

#: the paper's Table 1 rows (baselines, then CS-MIL) and Table 3 rows (attention variants)
TABLE1 = ["deepattnmisl_20x", "deepattnmisl_10x", "deepattnmisl_5x", "gated_attention_multiscale", "deepattnmisl_multiscale",
          "mdmil", "dsmil", "csmil", "csmil_joint"]
TABLE3 = ["csmil", "csmil_shared_tanh", "csmil_nonshared_relu", "csmil_nonshared_tanh", "csmil_reference", "csmil_flat"]
#: heads from the field (ABMIL, TransMIL, CLAM-SB, MONAI MILModel), in their own table
FIELD = list(FIELD_HEADS)
SUMMARY_KEYS = ("auc", "ap", "accuracy", "balanced_accuracy", "brier")


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p >= 0.5) == y))


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


#: metrics with bootstrap CIs (AUC by midranks: fast inside 2,000 resamples)
CI_METRICS = {"auc": stats.auc_score, "ap": average_precision_score, "accuracy": _accuracy, "brier": _brier}


def _nan_stats(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def combine(result: dict, variant: str, thresholds: list[float]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One prediction per test slide: the ensemble mean over split models (external test set) or the
    out-of-fold prediction (cross-validation), given each split's validation threshold. Returns (slide ids,
    probabilities, per-slide thresholds)."""
    runs = result["runs"][variant]
    if result["mode"] == "external_test":
        ids = list(runs[0]["test"])
        p = np.mean([[r["test"][i] for i in ids] for r in runs], axis=0)
        thr = np.full(len(ids), float(np.median(thresholds)))
    else:
        ids, p, thr = [], [], []
        for r, t in zip(runs, thresholds):
            ids += list(r["test"])
            p += list(r["test"].values())
            thr += [t] * len(r["test"])
        p, thr = np.asarray(p), np.asarray(thr)
    return ids, np.asarray(p, dtype=float), thr


def pooled_scores(result: dict, variant: str) -> tuple[list[str], np.ndarray]:
    """One score (a probability, a class-probability vector or a risk) per test slide: the mean over the split models
    (external test set) or the out-of-fold score (cross-validation). Returns (slide ids, scores)."""
    runs = result["runs"][variant]
    if result["mode"] == "external_test":
        ids = list(runs[0]["test"])
        return ids, np.mean([[r["test"][i] for i in ids] for r in runs], axis=0)
    ids, scores = [], []
    for r in runs:
        ids += list(r["test"])
        scores += list(r["test"].values())
    return ids, np.asarray(scores, dtype=float)


def aligned(ids_ref: Sequence[str], ids: Sequence[str], scores: np.ndarray) -> np.ndarray:
    """``scores`` (ordered as ``ids``) reordered to ``ids_ref``: paired comparisons score the same slides."""
    order = {i: k for k, i in enumerate(ids)}
    return scores[[order[i] for i in ids_ref]]


def against_reference(scores: dict[str, tuple[list[str], np.ndarray]], reference: str) -> dict[str, np.ndarray]:
    """Every other model's scores reordered to the reference's slides (``scores``: name -> (slide ids, scores))."""
    if reference not in scores:
        return {}
    ids_r = scores[reference][0]
    return {n: aligned(ids_r, ids, p) for n, (ids, p) in scores.items() if n != reference}


def _yp(result: dict, preds: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    ids = list(preds)
    return np.asarray([result["slides"][i]["label"] for i in ids]), np.asarray([preds[i] for i in ids], dtype=float)


def build_report(
    result: dict, reference: str = "csmil", n_resamples: int = 2000, seed: int = 0, by_patient: bool = True,
    protocol: dict | None = None,
) -> dict:
    """Metrics per split (mean ± sd), on the combined predictions (with bootstrap CIs), calibration, curves and
    paired comparisons (DeLong, bootstrap) of ``reference`` against every other variant."""
    models: dict[str, dict] = {}
    combined: dict[str, tuple] = {}
    for name, runs in result["runs"].items():
        per_split = []
        thresholds = [metrics.youden_threshold(*_yp(result, r["val"])) for r in runs]  # validation-chosen, per split
        for r, t in zip(runs, thresholds):
            y, p = _yp(result, r["test"])
            m = metrics.binary_metrics(y, p, t)
            m["best_epoch"] = (r.get("best") or {}).get("epoch")
            per_split.append(m)
        spread = {k: _nan_stats([s["at_0.5"][k] if k == "balanced_accuracy" else s[k] for s in per_split]) for k in SUMMARY_KEYS}
        ids, p, thr = combine(result, name, thresholds)
        y = np.asarray([result["slides"][i]["label"] for i in ids])
        groups = [result["slides"][i]["patient_id"] for i in ids] if by_patient else None
        combined[name] = (ids, y, p, groups)
        pooled = metrics.binary_metrics(y, p)
        pooled["at_val"] = metrics.threshold_metrics(y, p, thr)
        ci = {k: stats.bootstrap_ci(y, p, f, n_resamples, seed, groups=groups) for k, f in CI_METRICS.items()} if len(set(y)) > 1 else {}
        fpr, tpr, _ = roc_curve(y, p) if len(set(y)) > 1 else ([], [], [])
        prec, rec, _ = precision_recall_curve(y, p) if len(set(y)) > 1 else ([], [], [])
        models[name] = {
            "per_split": per_split,
            "mean": {k: v[0] for k, v in spread.items()},
            "sd": {k: v[1] for k, v in spread.items()},
            "combined": pooled,
            "ci95": ci,
            "calibration": metrics.calibration(y, p),
            "curves": {"roc": {"fpr": list(map(float, fpr)), "tpr": list(map(float, tpr))},
                       "pr": {"precision": list(map(float, prec)), "recall": list(map(float, rec))}},
            "predictions": {i: float(v) for i, v in zip(ids, p)},
        }
        if loc := mean_localisation(runs):  # attention models on cohorts with lesion masks: mean over splits, per scale
            models[name]["localisation"] = loc
    comparisons = {}
    if reference in combined:
        _, y, p_ref, groups = combined[reference]
        for name, p_other in against_reference({n: (c[0], c[2]) for n, c in combined.items()}, reference).items():
            if len(set(y)) < 2:
                continue
            comparisons[name] = {
                "delong": stats.delong_test(y, p_ref, p_other),
                "bootstrap": stats.paired_bootstrap_test(y, p_ref, p_other, stats.auc_score, n_resamples, seed, groups),
            }
    return envelope(result, reference, n_resamples, seed, by_patient, protocol, models, comparisons)


def envelope(result: dict, reference: str, n_resamples: int, seed: int, by_patient: bool, protocol: dict | None, models: dict,
             comparisons: dict, **task: Any) -> dict:
    """The report dict every task writes: protocol (with the ``task`` fields), splits, models, comparisons."""
    return {
        "protocol": {**(protocol or {}), **task, "mode": result["mode"], "num_splits": len(result["splits"]), "reference": reference,
                     "bootstrap_resamples": n_resamples, "bootstrap_unit": "patient" if by_patient else "slide", "seed": seed},
        "splits": result["splits"],
        "models": models,
        "comparisons": comparisons,
    }


def mean_localisation(runs: Sequence[dict]) -> dict[str, float] | None:
    """Per-scale localisation AUROC averaged over the splits that have one (None without lesion masks)."""
    loc = [r["localisation"] for r in runs if r.get("localisation")]
    return {s: float(np.mean([d[s] for d in loc])) for s in loc[0]} if loc else None


def localisation_table(report: dict, what: str) -> list[str]:
    """The report's localisation table (AUROC of ``what``, mean over splits; 20x first), empty without one."""
    located = [n for n in report["models"] if report["models"][n].get("localisation")]
    if not located:
        return []
    scales = sorted(report["models"][located[0]]["localisation"], key=lambda sc: -float(sc.rstrip("x")))
    lines = [f"## Attention localisation (AUROC of {what}, mean over splits)", "",
             "| model | " + " | ".join(scales) + " |", "|---" * (len(scales) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(_fmt(report["models"][n]["localisation"].get(sc), 3) for sc in scales) + " |" for n in located]
    return lines + [""]


def bootstrap_table(report: dict, key: str, what: str, nd: int = 3) -> list[str]:
    """Table 2 of the other tasks: the paired bootstrap of ``key`` (combined), the reference minus each model."""
    if not report["comparisons"]:
        return []
    ref = report["protocol"]["reference"]
    lines = [f"## Table 2: {ref} against each model (paired bootstrap of {what}, two-tailed)", "",
             f"| model | {what} | Δ (reference − model) | 95% CI of Δ | p |", "|---|---|---|---|---|"]
    for n, c in report["comparisons"].items():
        b = c["bootstrap"]
        lines.append(f"| {n} | {_fmt(report['models'][n]['combined'][key], nd)} | {_fmt(b['diff'], nd)} | [{_fmt(b['low'], nd)}, "
                     f"{_fmt(b['high'], nd)}] | {_fmt(b['p'])} |")
    return lines + [""]


def _fmt(x: Any, nd: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ms(model: dict, key: str) -> str:
    return f"{_fmt(model['mean'][key])} ± {_fmt(model['sd'][key], 3)}"


def _ci(model: dict, key: str) -> str:
    c = model["ci95"].get(key)
    return "n/a" if not c else f"{_fmt(c['estimate'])} [{_fmt(c['low'], 3)}, {_fmt(c['high'], 3)}]"


def _model_table(report: dict, names: Sequence[str]) -> list[str]:
    rows = ["| model | AUC (mean ± sd) | AP (mean ± sd) | accuracy (mean ± sd) | AUC, combined [95% CI] | AP, combined [95% CI] | accuracy, combined [95% CI] |",
            "|---|---|---|---|---|---|---|"]
    for n in names:
        m = report["models"][n]
        rows.append(f"| {n} | {_ms(m, 'auc')} | {_ms(m, 'ap')} | {_ms(m, 'accuracy')} | {_ci(m, 'auc')} | {_ci(m, 'ap')} | {_ci(m, 'accuracy')} |")
    return rows


SELECTION_TEXT = {"val_loss": "the lowest validation loss", "val_cindex": "the highest validation concordance index",
                  "val_auc": "the highest validation AUC", "val_acc": "the highest validation accuracy"}


def selection_text(protocol: Mapping[str, Any], default: str = "val_loss") -> str:
    """How each run's checkpoint was chosen, in words (``protocol["selection_metric"]``; reports written before 0.22
    carry none: the task's default)."""
    key = protocol.get("selection_metric") or default
    return f"its checkpoint chosen by {SELECTION_TEXT.get(key, key)}"


def recipe_text(protocol: Mapping[str, Any]) -> str:
    """The training recipe in words after "hyper-parameters" (``protocol["train_recipe"]``): nothing for the shared
    recipe (every model: the same optimiser), the exception for ``published``."""
    if protocol.get("train_recipe", "shared") == "shared":
        return ""
    return " (train_recipe published: each head from the field with the optimiser its authors published)"


def environment_lines(protocol: Mapping[str, Any]) -> list[str]:
    """The report's software line (``protocol["environment"]``, :func:`scripts.environment.environment`)."""
    env = protocol.get("environment")
    if not env:
        return []
    return ["Software (results are bit-identical only with the same versions): " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]


def render_markdown(report: dict, figures: Sequence[str] = ("roc.png", "pr.png", "calibration.png")) -> str:
    """The report as Markdown: protocol, Tables 1-4, thresholds and calibration, figures."""
    p = report["protocol"]
    names = list(report["models"])
    combined_what = "ensemble of the split models on the test set" if p["mode"] == "external_test" else "out-of-fold predictions pooled over splits"
    lines = [
        "# CS-MIL evaluation report", "",
        f"Protocol: {p['num_splits']} patient-level splits ({p['mode'].replace('_', ' ')}); every model trained with the same splits "
        f"and hyper-parameters{recipe_text(p)}, {selection_text(p)}, test slides scored with {p.get('test_bags', 'R')} random bags. "
        f"'mean ± sd' is over splits; 'combined' is the {combined_what}, with {p['bootstrap_resamples']} bootstrap resamples "
        f"of {p['bootstrap_unit']}s (seed {p['seed']}) for the 95% CIs.", "", *environment_lines(p),
    ]
    t1 = [n for n in TABLE1 if n in names] + [n for n in names if n not in TABLE1 and n not in TABLE3 and n not in FIELD and "[" not in n]
    if t1:
        lines += ["## Table 1: CS-MIL and the multi-scale baselines", "", *_model_table(report, t1), ""]
    field = [n for n in FIELD if n in names]
    if field:
        lines += ["## Heads from the field: ABMIL, TransMIL, CLAM-SB, MONAI MILModel (20x alone / scales concatenated)", "",
                  *_model_table(report, field), ""]
    if report["comparisons"]:
        lines += [f"## Table 2: {p['reference']} against each model (paired, two-tailed, combined predictions)", "",
                  "| model | AUC | ΔAUC (reference − model) | bootstrap 95% CI of Δ | bootstrap p | DeLong z | DeLong p |", "|---|---|---|---|---|---|---|"]
        for n, c in report["comparisons"].items():
            d, b = c["delong"], c["bootstrap"]
            lines.append(f"| {n} | {_fmt(d['auc_2'])} | {_fmt(d['diff'])} | [{_fmt(b['low'], 3)}, {_fmt(b['high'], 3)}] | {_fmt(b['p'])} | {_fmt(d['z'], 2)} | {_fmt(d['p'])} |")
        lines.append("")
    t3 = [n for n in TABLE3 if n in names]
    if len(t3) > 1:
        lines += ["## Table 3: cross-scale attention variants (kernel sharing x activation; reference-code behaviour; pooling)", "",
                  *_model_table(report, t3), ""]
    t4 = [n for n in names if "[" in n]
    if t4:
        lines += ["## Table 4: ablation", "", *_model_table(report, t4), ""]
    lines += localisation_table(report, "patch attention vs lesion masks, positive test slides")
    lines += ["## Thresholds and calibration (combined predictions)", "",
              "| model | sens / spec @0.5 | balanced acc @0.5 | sens / spec @val threshold | balanced acc @val | Brier | ECE |", "|---|---|---|---|---|---|---|"]
    for n in names:
        c = report["models"][n]["combined"]
        a, v = c["at_0.5"], c["at_val"]
        lines.append(f"| {n} | {_fmt(a['sensitivity'], 3)} / {_fmt(a['specificity'], 3)} | {_fmt(a['balanced_accuracy'], 3)} | "
                     f"{_fmt(v['sensitivity'], 3)} / {_fmt(v['specificity'], 3)} | {_fmt(v['balanced_accuracy'], 3)} | "
                     f"{_fmt(c['brier'])} | {_fmt(report['models'][n]['calibration']['ece'])} |")
    lines += ["", "The validation threshold maximises Youden's J on each split's validation slides.", ""]
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """``report.json``, ``report.md``, ``roc.png``, ``pr.png`` and ``calibration.png`` in ``out_dir`` (atomic writes)."""
    from scripts.evaluation import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "report.json", "md": out / "report.md"}
    task = report["protocol"].get("task")
    if task == "survival":  # the other tasks' reports (scripts.evaluation.survival_report / multiclass)
        from scripts.evaluation.survival_report import render_survival, write_km_figure

        files["km"], markdown = write_km_figure(report, out / "km.png"), render_survival(report)
    elif task == "classification":
        from scripts.evaluation.multiclass import render_multiclass

        markdown = render_multiclass(report)
    else:
        files.update(plots.write_figures(report, out))
        markdown = render_markdown(report)
    atomic_write_json(files["json"], report)
    atomic_write_bytes(files["md"], markdown.encode())
    logger.info("evaluation report: %s", files["md"])
    return files
