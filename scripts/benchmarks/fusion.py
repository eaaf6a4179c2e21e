"""Cross-scale fusion on a generated co-location cohort: the full evaluation protocol (`run evaluate`) for every
model, the paper's CS-MIL variants, the baselines and the ablations of csmil_joint.

The cohort is one of ``scripts.data.demo.COLOCATION_COHORTS`` (the demo's principle with other cue sizes,
contrasts, shapes, lesion counts and pyramid levels; cue counts balanced between classes, so only co-location
tells them apart). Baseline measured in the same run: the concatenation baseline (``dsmil``). Ratios:
``joint_vs_concat`` and ``joint_vs_paper`` (combined AUC of csmil_joint over dsmil / csmil) and
``best_single_scale`` (the best single-scale model's combined AUC, ~0.5 on a cohort without single-scale cues).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from scripts.benchmarks.common import report
from scripts.data.demo import COLOCATION_COHORTS

ROOT = Path(__file__).resolve().parents[2]
SINGLE_SCALE = ("deepattnmisl_20x", "deepattnmisl_10x", "deepattnmisl_5x")
ABLATIONS = ("ablation_paper_fusion", "ablation_attention_pooling")


def cohort_overrides(name: str, patients: int) -> list[str]:
    """Command-line overrides that make ``run evaluate`` generate the named co-location cohort."""
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in COLOCATION_COHORTS[name].items()}
    size = params.pop("size")
    return ["--demo_num_patients", str(patients), "--demo_slide_size", str(size), "--demo_options", json.dumps(params)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks fusion", description=__doc__)
    ap.add_argument("--cohort", default="clean", choices=sorted(COLOCATION_COHORTS))
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="eval_workers")
    ap.add_argument("--models", default="all", help="comma-separated, or 'all' (the pipeline config's eval_models + ablations)")
    ap.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples of the report")
    ap.add_argument("--workdir", default="outputs/bench-fusion", help="cohort, features and runs (reused when present)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve() / f"{args.cohort}-{args.patients}"
    models = None if args.models == "all" else args.models.split(",")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluate", "--config_file", "configs/evaluate.yaml",
           "--dataset_dir", str(work / "data"), "--output_dir", str(work / "out"), "--progress", "False",
           "--eval_num_splits", str(args.splits), "--eval_workers", str(args.workers), "--eval_reference", "csmil_joint",
           "--eval_bootstrap_resamples", str(args.bootstrap), *cohort_overrides(args.cohort, args.patients)]
    if models is None:
        import yaml

        models = list(yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())["eval_models"]) + list(ABLATIONS)
    cmd += ["--eval_models", json.dumps(models)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    wall = time.perf_counter() - t
    rep = json.loads((work / "out" / "report" / "report.json").read_text())
    m = rep["models"]
    rows = [{"model": n, "auc_mean": m[n]["mean"]["auc"], "auc_sd": m[n]["sd"]["auc"], "auc_combined": m[n]["combined"]["auc"],
             "ap_combined": m[n]["combined"]["ap"], "acc_combined": m[n]["combined"]["accuracy"]}
            for n in sorted(m, key=lambda n: -m[n]["combined"]["auc"])]
    for row in rows:
        row.update({f"loc_{s}": v for s, v in m[row["model"]].get("localisation", {}).items()})
    print(f"cohort {args.cohort} ({args.patients} patients), {args.splits} splits, {wall / 60:.1f} min; report: {work / 'out' / 'report' / 'report.md'}")
    auc = {n: m[n]["combined"]["auc"] for n in m}
    ratios = {"joint_vs_concat": auc["csmil_joint"] / auc["dsmil"]} if {"csmil_joint", "dsmil"} <= set(auc) else {}
    if {"csmil_joint", "csmil"} <= set(auc):
        ratios["joint_vs_paper"] = auc["csmil_joint"] / auc["csmil"]
    singles = [auc[n] for n in SINGLE_SCALE if n in auc]
    if singles:
        ratios["best_single_scale"] = max(singles)
    report("fusion", rows, ratios, args.json)

