"""Stain normalisation and stain augmentation measured: the full evaluation protocol on a co-location cohort scanned
at three sites (``scripts.data.demo.STAIN_COHORTS``: each site its own H&E staining, every site holding both classes)
without normalisation and with each method (``--stain_normalization macenko | reinhard``), each optionally with
the stain views of MIL training (an arm ``<method>+views``: ``--stain_views --views``), on the same cohort and splits.

Key metric per model and arm: the combined (pooled out-of-fold) AUC, with the paired DeLong p-value against the arm's
base (``<method>+views`` against ``<method>``, a method against ``none``; same test slides). Baseline measured in the
same run: no normalisation, no views (the arm ``none``). Ratios: ``<arm>_vs_none`` for the reference model
(csmil_joint) and the mean over models.

    python -m scripts.benchmarks stain [--patients 60] [--splits 3] [--methods none,none+views,macenko] [--views 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from scripts.benchmarks.common import protocol_reports, report
from scripts.data.demo import STAIN_COHORTS


def cohort_overrides(name: str, patients: int) -> list[str]:
    params = dict(STAIN_COHORTS[name])
    size = params.pop("size")
    return ["--demo_num_patients", str(patients), "--demo_slide_size", str(size), "--demo_options", json.dumps(params)]


VIEWS = 4


def views_of(arm: str, views: int | None = None) -> int:
    """Stain views of an arm (``<method>`` or ``<method>+views``)."""
    return (VIEWS if views is None else views) if arm.endswith("+views") else 0


def paired_p(reports: dict[int, dict], base: dict[int, dict] | None, model: str, labels: dict[str, int] | None) -> str:
    """DeLong p-value of an arm against its ``base`` arm on the same test slides, per seed ("" without labels)."""
    from scripts.evaluation.stats import delong_test

    if base is None or not labels:
        return ""
    out = []
    for seed in sorted(reports):
        a, b = base[seed]["models"][model]["predictions"], reports[seed]["models"][model]["predictions"]
        ids = sorted(set(a) & set(b))
        out.append(f"{delong_test([labels[i] for i in ids], [a[i] for i in ids], [b[i] for i in ids])['p']:.3f}")
    return " ".join(out)


def summarise(by_method: dict[str, dict[int, dict]], labels: dict[str, int] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Rows (model x arm: combined AUC mean over seeds, its CIs, the paired DeLong p against the arm's base when the
    slides' ``labels`` are given: ``<method>+views`` against ``<method>``, a method against ``none``) and the ratios
    against no normalisation."""
    rows, value = [], {}
    for method, reports in by_method.items():
        seeds = sorted(reports)
        base = by_method.get(method.split("+")[0] if method.endswith("+views") else "none") if method != "none" else None
        for model in reports[seeds[0]]["models"]:
            per = [reports[s]["models"][model] for s in seeds]
            auc = float(np.mean([m["combined"]["auc"] for m in per]))
            value[(model, method)] = auc
            rows.append({"model": model, "stain_normalization": method.split("+")[0], "stain_views": views_of(method), "auc_combined": auc,
                         "auc_mean_over_splits": float(np.mean([m["mean"]["auc"] for m in per])),
                         "ci95": " ".join(f"[{m['ci95']['auc']['low']:.3f}, {m['ci95']['auc']['high']:.3f}]" for m in per if "ci95" in m),
                         "p_vs_base": paired_p(reports, base, model, labels)})
    rows.sort(key=lambda r: (r["model"], r["stain_normalization"], r["stain_views"]))
    ratios = {}
    models = sorted({m for m, _ in value})
    for method in by_method:
        if method == "none":
            continue
        if ("csmil_joint", method) in value and ("csmil_joint", "none") in value:
            ratios[f"{method}_vs_none_csmil_joint"] = value[("csmil_joint", method)] / value[("csmil_joint", "none")]
        pairs = [(value[(m, method)], value[(m, "none")]) for m in models if (m, method) in value and (m, "none") in value]
        if pairs:
            ratios[f"{method}_vs_none_mean"] = float(np.mean([a for a, _ in pairs]) / np.mean([b for _, b in pairs]))
    return rows, ratios


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks stain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", default="clean_sites", choices=sorted(STAIN_COHORTS))
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--seeds", default="0", help="comma-separated protocol seeds (--eval_seed)")
    ap.add_argument("--methods", default="none,macenko,reinhard", help="arms: none | macenko | reinhard, each optionally +views")
    ap.add_argument("--views", type=int, default=VIEWS, help="stain views of the +views arms (--stain_views)")
    ap.add_argument("--workers", type=int, default=1, help="eval_workers")
    ap.add_argument("--models", default="csmil_joint,dsmil,deepattnmisl_20x,deepattnmisl_10x,deepattnmisl_5x",
                    help="comma-separated, or 'default' (evaluate.yaml's eval_models)")
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--workdir", default="outputs/bench-stain", help="cohort, features and runs (reused when present)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve() / f"{args.cohort}-{args.patients}"
    models = [] if args.models == "default" else ["--eval_models", json.dumps(args.models.split(","))]
    t = time.perf_counter()
    by_method = {}
    for method in args.methods.split(","):
        norm, views = method.split("+")[0], views_of(method, args.views)
        stain = (["--stain_normalization", norm] if norm != "none" else []) + (["--stain_views", str(views)] if views else [])
        by_method[method] = protocol_reports(work, [int(x) for x in args.seeds.split(",")], args.splits, args.workers, args.bootstrap,
                                             [*cohort_overrides(args.cohort, args.patients), *models, *stain], tag=f"{method}-")
    import csv

    with open(work / "data" / "manifest.csv", newline="") as f:
        labels = {r["slide_id"]: int(r["label"]) for r in csv.DictReader(f)}
    rows, ratios = summarise(by_method, labels)
    print(f"cohort {args.cohort} ({args.patients} patients), {args.splits} splits x seeds {args.seeds}, methods {args.methods}, "
          f"{(time.perf_counter() - t) / 60:.1f} min")
    report("stain", rows, ratios, args.json)
