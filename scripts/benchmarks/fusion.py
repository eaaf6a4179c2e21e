"""Cross-scale fusion on a generated co-location cohort: the full evaluation protocol (`run evaluate`) for every
model, the paper's CS-MIL variants, the baselines and the ablations of csmil_joint, once per protocol seed.

``--seeds 0,1,2`` repeats the protocol with ``--eval_seed`` (other splits, initialisations and bag orders) on the
same cohort and features (one shared cache): on cohorts of this size the spread between seeds is as large as
the gaps between models (docs/evaluation.md), so a table of one seed does not rank them.

The cohort is one of ``scripts.data.demo.COLOCATION_COHORTS`` (the demo's principle with other cue sizes,
contrasts, shapes, lesion counts and pyramid levels; cue counts balanced between classes, so only co-location
tells them apart). Baseline measured in the same run: the concatenation baseline (``dsmil``). Ratios:
``joint_vs_concat`` and ``joint_vs_paper`` (combined AUC of csmil_joint over dsmil / csmil) and
``best_single_scale`` (the best single-scale model's combined AUC, ~0.5 on a cohort without single-scale cues),
each on the mean over seeds of the combined (out-of-fold) AUC.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from scripts.benchmarks.common import protocol_reports, report
from scripts.data.demo import COLOCATION_COHORTS

ROOT = Path(__file__).resolve().parents[2]
SINGLE_SCALE = ("deepattnmisl_20x", "deepattnmisl_10x", "deepattnmisl_5x")
ABLATIONS = ("ablation_paper_fusion", "ablation_attention_pooling")


def cohort_overrides(name: str, patients: int) -> list[str]:
    """Command-line overrides that make ``run evaluate`` generate the named co-location cohort."""
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in COLOCATION_COHORTS[name].items()}
    size = params.pop("size")
    return ["--demo_num_patients", str(patients), "--demo_slide_size", str(size), "--demo_options", json.dumps(params)]


def summarise(reports: dict[int, dict]) -> tuple[list[dict], dict[str, float]]:
    """Rows (one per model, best mean combined AUC first) and ratios from ``report.json`` of each protocol seed."""
    seeds = sorted(reports)
    names = [n for n in reports[seeds[0]]["models"] if all(n in reports[s]["models"] for s in seeds)]
    rows = []
    for n in names:
        per = [reports[s]["models"][n] for s in seeds]
        comb = [m["combined"]["auc"] for m in per]
        row = {"model": n, "auc_combined": float(np.mean(comb)), "auc_combined_sd": float(np.std(comb)),
               "auc_mean": float(np.mean([m["mean"]["auc"] for m in per])), "ap_combined": float(np.mean([m["combined"]["ap"] for m in per])),
               "acc_combined": float(np.mean([m["combined"]["accuracy"] for m in per])),
               "per_seed": " ".join(f"{c:.3f}" for c in comb)}
        loc = [m.get("localisation") or {} for m in per]
        for scale in loc[0]:
            row[f"loc_{scale}"] = float(np.nanmean([lo.get(scale, np.nan) for lo in loc]))
        rows.append(row)
    rows.sort(key=lambda r: -r["auc_combined"])
    auc = {r["model"]: r["auc_combined"] for r in rows}
    ratios = {"joint_vs_concat": auc["csmil_joint"] / auc["dsmil"]} if {"csmil_joint", "dsmil"} <= set(auc) else {}
    if {"csmil_joint", "csmil"} <= set(auc):
        ratios["joint_vs_paper"] = auc["csmil_joint"] / auc["csmil"]
    singles = [auc[n] for n in SINGLE_SCALE if n in auc]
    if singles:
        ratios["best_single_scale"] = max(singles)
    return rows, ratios


def record_cells(path: Path, cohort: str, patients: int, reports: dict[int, dict]) -> list[tuple[str, str, float]]:
    """Merge each model's combined AUC per protocol seed into the default-model rule's evidence file ``path``
    (``{"grid": [...], "auc": {model: {"<cohort>-<patients>/seed<s>": auc}}}``, as ``docs/data/colocation_protocol.json``;
    created when missing), rounded to 3 decimals and written atomically; a cell already recorded is replaced.
    Returns the (model, cell, auc) written."""
    from scripts.cache import atomic_write_bytes

    data = json.loads(path.read_text()) if path.is_file() else {"grid": [], "auc": {}}
    if not isinstance(data.get("auc"), dict) or not isinstance(data.get("grid"), list):
        raise SystemExit(f"{path}: not a default-model rule file (it needs 'grid' and 'auc', as docs/data/colocation_protocol.json); "
                         "fix: pass --record with that file or a new path")
    written = []
    for seed, rep in sorted(reports.items()):
        cell = f"{cohort}-{patients}/seed{seed}"
        if cell not in data["grid"]:
            data["grid"].append(cell)
        for name, metrics in rep["models"].items():
            auc = round(float(metrics["combined"]["auc"]), 3)
            data["auc"].setdefault(name, {})[cell] = auc
            written.append((name, cell, auc))
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
    return written


def recipe_row_name(model: str, train_recipe: str) -> str:
    """A row's name under ``train_recipe``: ``<model>[train_recipe=<recipe>]`` for a model with a recipe of its own
    (the name the protocol's ablation ids give the same run), the plain name for a model that trains as under shared."""
    from scripts.mil.registry import build_model

    own = train_recipe != "shared" and build_model(model, 16).published_recipe() is not None
    return f"{model}[train_recipe={train_recipe}]" if own else model


def reference_model(models: list[str], reference: str = "auto") -> str:
    """``eval_reference`` of the run: ``reference``, or (``auto``) csmil_joint when it is among ``models``, else the first."""
    if reference != "auto":
        return reference
    return "csmil_joint" if "csmil_joint" in models else models[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks fusion", description=__doc__)
    ap.add_argument("--cohort", default="clean", choices=sorted(COLOCATION_COHORTS))
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--seeds", default="0", help="comma-separated protocol seeds (--eval_seed), e.g. 0,1,2")
    ap.add_argument("--workers", type=int, default=2, help="eval_workers")
    ap.add_argument("--models", default="all", help="comma-separated, or 'all' (eval_models, eval_transformer_models and the fusion ablations)")
    ap.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples of the report")
    ap.add_argument("--workdir", default="outputs/bench-fusion", help="cohort, features and runs (reused when present)")
    ap.add_argument("--reference", default="auto", help="the model the report compares the others with (eval_reference); "
                    "auto: csmil_joint when it is run, else the first of --models, so one new model's cells cost that model alone")
    ap.add_argument("--train_recipe", default="shared", choices=("shared", "published"),
                    help="train_recipe of every run; published: the heads from the field train with their authors' optimiser "
                         "and their rows are named <model>[train_recipe=published] (outputs in out-published-seed<seed>)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--record", default=None, help="merge every model's combined AUC per seed into this default-model rule "
                    "file (docs/data/colocation_protocol.json: python -m scripts.evaluation.model_choice reads it); "
                    "shared recipe only, the rule's evidence")
    args = ap.parse_args(argv)
    if args.record and args.train_recipe != "shared":
        ap.error("--record takes the shared recipe's cells only (the rule ranks models under one recipe, not recipes); "
                 "fix: keep the published rows with --json")
    work = Path(args.workdir).resolve() / f"{args.cohort}-{args.patients}"
    seeds = [int(x) for x in args.seeds.split(",")]
    models = None if args.models == "all" else args.models.split(",")
    if models is None:
        import yaml

        raw = yaml.safe_load((ROOT / "configs" / "evaluate.yaml").read_text())
        models = list(raw["eval_models"]) + list(raw["eval_transformer_models"]) + list(ABLATIONS)
    t = time.perf_counter()
    reference = reference_model(models, args.reference)
    recipe = [] if args.train_recipe == "shared" else ["--train_recipe", args.train_recipe]
    reports = protocol_reports(work, seeds, args.splits, args.workers, args.bootstrap,
                               [*cohort_overrides(args.cohort, args.patients), "--eval_models", json.dumps(models), *recipe],
                               tag="" if not recipe else f"{args.train_recipe}-", reference=reference)
    rows, ratios = summarise(reports)
    if recipe:
        rows = [dict(r, model=recipe_row_name(r["model"], args.train_recipe)) for r in rows]
    print(f"cohort {args.cohort} ({args.patients} patients), {args.splits} splits x seeds {seeds}, "
          f"{(time.perf_counter() - t) / 60:.1f} min; combined AUC = mean over seeds (per_seed lists them)")
    report("fusion", rows, ratios, args.json)
    if args.record:
        cells = record_cells(Path(args.record), args.cohort, args.patients, reports)
        print(f"recorded {len(cells)} cells in {args.record}: " + ", ".join(f"{m} {c} {a:.3f}" for m, c, a in cells))
