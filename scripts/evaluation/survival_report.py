"""The protocol's report for survival: Harrell's concordance of the predicted risk (lifelines) per split and on the
combined predictions with a patient-level bootstrap CI, Kaplan-Meier curves of the high- and low-risk halves with a
log-rank test, and the paired bootstrap of the c-index against the reference model.

Cross-validation's combined predictions come from one model per split, whose risks are on different scales (time bins
and calibration differ per training set). The combined c-index therefore compares only slides of one split
(:func:`scripts.tasks.survival.stratified_concordance`; the naive c-index over every pair is kept as
``c_index_pooled``), and the risk halves are cut at each split's own median. On an external test set every model
scores every slide (the ensemble of the split models), so there is one stratum."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from scripts.evaluation.report import (against_reference, bootstrap_table, envelope, environment_lines, localisation_table, mean_localisation,
                                       pooled_scores, recipe_text, selection_text)
from scripts.evaluation.stats import _resample_indices, paired_summary
from scripts.tasks.survival import concordance, stratified_concordance


def _bootstrap(t: np.ndarray, e: np.ndarray, risks: Sequence[np.ndarray], n: int, seed: int, groups: Sequence | None,
               strata: np.ndarray | None = None) -> np.ndarray:
    """Stratified c-index of each risk vector on the same resamples [n_valid, len(risks)] (resamples without a
    comparable pair skipped; a resampled slide keeps its stratum)."""
    rng = np.random.default_rng(seed)
    out: list[list[float]] = []
    tries = 0
    while len(out) < n and tries < 10 * n:
        for idx in _resample_indices(len(t), groups, n - len(out), rng):
            tries += 1
            if e[idx].any():
                vals = [stratified_concordance(t[idx], e[idx], r[idx], None if strata is None else strata[idx]) for r in risks]
                if not any(math.isnan(v) for v in vals):
                    out.append(vals)
    return np.asarray(out).reshape(-1, len(risks))


def risk_groups(t: np.ndarray, e: np.ndarray, r: np.ndarray, strata: np.ndarray | None = None) -> dict:
    """High- vs low-risk halves (above the median risk of the slide's stratum: its split's model): Kaplan-Meier
    curves (lifelines) and the log-rank test."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    s = np.zeros(len(r), int) if strata is None else np.asarray(strata)
    high = np.zeros(len(r), bool)
    for k in np.unique(s):
        high[s == k] = r[s == k] > np.median(r[s == k])
    if high.all() or not high.any():
        return {}
    curves = {}
    for name, sel in (("low", ~high), ("high", high)):
        km = KaplanMeierFitter().fit(t[sel], e[sel])
        sf = km.survival_function_
        curves[name] = {"time": [float(x) for x in sf.index], "survival": [float(x) for x in sf.iloc[:, 0]], "n": int(sel.sum()),
                        "median": float(km.median_survival_time_)}
    test = logrank_test(t[high], t[~high], e[high], e[~high])
    return {"curves": curves, "logrank_p": float(test.p_value), "logrank_statistic": float(test.test_statistic)}


def split_strata(result: dict, ids: Sequence[str]) -> np.ndarray | None:
    """The split whose model scored each slide of the combined predictions (cross-validation), or None (an external
    test set: every split's model scored every slide, and the combined score is their mean)."""
    if result["mode"] == "external_test":
        return None
    runs = next(iter(result["runs"].values()))
    of = {i: k for k, run in enumerate(runs) for i in run["test"]}
    return np.asarray([of[i] for i in ids])


def build_survival_report(result: dict, reference: str, n_resamples: int = 2000, seed: int = 0, by_patient: bool = True,
                          protocol: dict | None = None) -> dict:
    """Per model: c-index per split (mean ± sd) and combined [95% CI], risk groups; paired bootstrap against ``reference``."""
    slides = result["slides"]
    models, combined = {}, {}
    for name, runs in result["runs"].items():
        per_split = []
        for run in runs:
            ids = list(run["test"])
            per_split.append({"c_index": concordance([slides[i]["time"] for i in ids], [slides[i]["event"] for i in ids],
                                                     [run["test"][i] for i in ids]), "best_epoch": (run.get("best") or {}).get("epoch")})
        ids, r = pooled_scores(result, name)
        t = np.asarray([slides[i]["time"] for i in ids], float)
        e = np.asarray([slides[i]["event"] for i in ids], int)
        groups = [slides[i]["patient_id"] for i in ids] if by_patient else None
        strata = split_strata(result, ids)
        combined[name] = (ids, t, e, r, groups, strata)
        vals = np.asarray([s["c_index"] for s in per_split if not math.isnan(s["c_index"])])
        dist = _bootstrap(t, e, [r], n_resamples, seed, groups, strata)[:, 0]
        est = stratified_concordance(t, e, r, strata)
        models[name] = {
            "per_split": per_split,
            "mean": {"c_index": float(vals.mean()) if len(vals) else float("nan")},
            "sd": {"c_index": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0},
            "combined": {"n": int(len(t)), "events": int(e.sum()), "c_index": est, "c_index_pooled": concordance(t, e, r),
                         "strata": "split" if strata is not None else None, "risk_groups": risk_groups(t, e, r, strata)},
            "ci95": {"c_index": {"estimate": est, "low": float(np.quantile(dist, 0.025)), "high": float(np.quantile(dist, 0.975)),
                                 "n_resamples": int(len(dist))}},
            "predictions": {i: float(v) for i, v in zip(ids, r)},
        }
        if loc := mean_localisation(runs):
            models[name]["localisation"] = loc
    comparisons = {}
    if reference in combined:
        _, t, e, r_ref, groups, strata = combined[reference]
        for name, other in against_reference({n: (c[0], c[3]) for n, c in combined.items()}, reference).items():
            dist = _bootstrap(t, e, [r_ref, other], n_resamples, seed, groups, strata)
            diff = models[reference]["combined"]["c_index"] - stratified_concordance(t, e, other, strata)
            comparisons[name] = {"bootstrap": paired_summary(diff, dist[:, 0] - dist[:, 1])}
    return envelope(result, reference, n_resamples, seed, by_patient, protocol, models, comparisons, task="survival")


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}g}" if nd == 2 else f"{x:.{nd}f}"


def render_survival(report: dict) -> str:
    """The survival report as Markdown (with ``km.png``)."""
    p = report["protocol"]
    lines = ["# CS-MIL evaluation report: survival", "",
             f"Protocol: {p['num_splits']} patient-level splits stratified by event ({p['mode'].replace('_', ' ')}); every model trained "
             f"with the same splits and hyper-parameters{recipe_text(p)} (discrete-time likelihood), {selection_text(p, 'val_cindex')}. "
             "c-index: Harrell's concordance of the predicted risk (lifelines); 'mean ± sd' over splits, 'combined' on the pooled test "
             f"predictions with {p['bootstrap_resamples']} bootstrap resamples of {p['bootstrap_unit']}s. "
             + ("Each split's model scores its own test slides on its own risk scale, so 'combined' counts only the pairs of slides "
                "one split scored (the concordance over every pair is in report.json, `c_index_pooled`), and the risk groups are each "
                "split's slides above and below that split's median risk. " if p["mode"] != "external_test" else
                "Risk groups: the combined predictions split at their median. ")
             + "Log-rank test of the two Kaplan-Meier curves.", "", *environment_lines(p),
             "## Models", "",
             "| model | c-index (mean ± sd) | c-index, combined [95% CI] | median time, low / high risk | log-rank p |", "|---|---|---|---|---|"]
    for n, m in report["models"].items():
        c, g = m["combined"], m["combined"]["risk_groups"]
        ci = m["ci95"]["c_index"]
        med = f"{_f(g['curves']['low']['median'], 1)} / {_f(g['curves']['high']['median'], 1)}" if g else "n/a"
        lines.append(f"| {n} | {_f(m['mean']['c_index'])} ± {_f(m['sd']['c_index'])} | {_f(ci['estimate'])} [{_f(ci['low'])}, {_f(ci['high'])}] | "
                     f"{med} | {_f(g.get('logrank_p'), 2) if g else 'n/a'} |")
    lines.append("")
    lines += bootstrap_table(report, "c_index", "the c-index")
    lines += localisation_table(report, "the earliest time bin's patch attention vs lesion masks, test slides with lesions")
    lines += ["## Figures", "", "![km.png](km.png)", ""]
    return "\n".join(lines)


def write_km_figure(report: dict, path) -> Any:
    """``km.png``: Kaplan-Meier curves of the risk halves, one panel per model (the reference first)."""
    from scripts.evaluation.plots import _save, plt

    ref = report["protocol"]["reference"]
    names = sorted(report["models"], key=lambda n: n != ref)
    cols = min(4, len(names))
    rows = int(math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, n in zip(axes.ravel(), names):
        g = report["models"][n]["combined"]["risk_groups"]
        for grp, colour in (("low", "tab:blue"), ("high", "crimson")):
            if g:
                c = g["curves"][grp]
                ax.step(c["time"], c["survival"], where="post", color=colour, label=f"{grp} risk (n={c['n']})")
        ax.set(title=f"{n}\nc {report['models'][n]['combined']['c_index']:.3f}, log-rank p {g.get('logrank_p', float('nan')):.2g}" if g else n,
               ylim=(0, 1.02), xlabel="time", ylabel="survival")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)
