"""The tasks beyond binary on their generated cohorts (``scripts.data.demo.TASK_COHORTS``): the full evaluation
protocol (``run evaluate``) for every model on the three-class co-location cohort (classes differ in which ring shape
surrounds the texture) or on the survival cohort (times shorten with the co-located lesion burden).

Key metric per model: the combined (pooled out-of-fold) macro one-vs-rest AUC, or Harrell's c-index over the pairs
of slides one split's model scored (``scripts.evaluation.survival_report``). Baseline measured
in the same run: the best single-scale model (``deepattnmisl_20x/10x/5x``, which see one cue only). Ratios:
``joint_vs_best_single`` (csmil_joint over the best single-scale model) and ``joint_vs_default`` (over ``dsmil``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from pathlib import Path

import numpy as np

from scripts.benchmarks.common import protocol_reports, report
from scripts.data.demo import TASK_COHORTS

SINGLE_SCALE = ("deepattnmisl_20x", "deepattnmisl_10x", "deepattnmisl_5x")


def cohort_overrides(name: str, patients: int) -> list[str]:
    """Command-line overrides that make ``run evaluate`` generate the named cohort and train for its task."""
    params = dict(TASK_COHORTS[name])
    size = params.pop("size")
    out = ["--demo_num_patients", str(patients), "--demo_slide_size", str(size), "--demo_options", json.dumps(params)]
    if params.get("survival"):
        return out + ["--task", "survival"]
    return out + ["--label_map", json.dumps({str(i): i for i in range(params["num_classes"])})]


def key_metric(report_json: dict) -> str:
    return "c_index" if report_json["protocol"].get("task") == "survival" else "macro_auc"


def summarise(reports: dict[int, dict]) -> tuple[list[dict], dict[str, float]]:
    """Rows (best mean combined metric first) and ratios from each protocol seed's ``report.json``."""
    seeds = sorted(reports)
    key = key_metric(reports[seeds[0]])
    names = [n for n in reports[seeds[0]]["models"] if all(n in reports[s]["models"] for s in seeds)]
    rows = []
    for n in names:
        per = [reports[s]["models"][n] for s in seeds]
        comb = [m["combined"][key] for m in per]
        rows.append({"model": n, f"{key}_combined": float(np.mean(comb)), f"{key}_mean_over_splits": float(np.mean([m["mean"][key] for m in per])),
                     "ci95": " ".join(f"[{m['ci95'][key]['low']:.3f}, {m['ci95'][key]['high']:.3f}]" for m in per),
                     "per_seed": " ".join(f"{c:.3f}" for c in comb)})
        if all("c_index_pooled" in m["combined"] for m in per):  # survival: the c-index over every pair, as before 0.24.0
            rows[-1][f"{key}_pooled"] = float(np.mean([m["combined"]["c_index_pooled"] for m in per]))
    rows.sort(key=lambda r: -r[f"{key}_combined"])
    value = {r["model"]: r[f"{key}_combined"] for r in rows}
    ratios = {}
    singles = [value[n] for n in SINGLE_SCALE if n in value]
    if singles:
        ratios["best_single_scale"] = max(singles)
        if "csmil_joint" in value:
            ratios["joint_vs_best_single"] = value["csmil_joint"] / max(singles)
    if {"csmil_joint", "dsmil"} <= set(value):
        ratios["joint_vs_default"] = value["csmil_joint"] / value["dsmil"]
    return rows, ratios


def burden_concordance(slides: dict[str, dict], risks: dict[str, dict[str, float]]) -> list[dict]:
    """Can a model count lesions, or only see that there is one? Harrell's c-index of each model's pooled
    out-of-fold risk (``risks``: model -> slide id -> risk; the patient's risk is the mean of its slides') on all
    patients and on the patients of each pair of lesion burdens (``slides``: slide id -> ``patient_id``, ``burden``,
    ``time``, ``event``: the survival demo's manifest, whose label column is the burden), beside two oracles: the
    true burden (``oracle_count``) and only whether there is a lesion (``oracle_presence``, which ties burdens 1 and 2).
    A model that sees presence but cannot count sits near ``oracle_presence``, at 0.5 on the pair (1, 2).
    With a ``split`` per slide (the protocol's test split of its patient) only the pairs of one split are compared
    (:func:`scripts.tasks.survival.stratified_concordance`: each split's model has its own risk scale), for the
    oracles too."""
    from scripts.tasks.survival import stratified_concordance

    patients: dict[str, dict] = {}
    for sid, s in slides.items():
        patients.setdefault(s["patient_id"], {"burden": int(s["burden"]), "time": float(s["time"]), "event": int(s["event"]),
                                              "split": s.get("split"), "slides": []})
        patients[s["patient_id"]]["slides"].append(sid)
    burdens = sorted({p["burden"] for p in patients.values()})
    scores = {"oracle_count": {k: float(p["burden"]) for k, p in patients.items()},
              "oracle_presence": {k: float(p["burden"] > 0) for k, p in patients.items()}}
    for name, by_slide in risks.items():
        scores[name] = {k: float(np.mean([by_slide[s] for s in p["slides"]])) for k, p in patients.items()
                        if all(s in by_slide for s in p["slides"])}
    rows = []
    for name, score in scores.items():
        row = {"model": name, "patients": len(score)}
        for pair in [None, *itertools.combinations(burdens, 2)]:
            ids = [k for k in score if pair is None or patients[k]["burden"] in pair]
            key = "c_index" if pair is None else f"c_index_{pair[0]}v{pair[1]}"
            strata = [patients[k]["split"] for k in ids] if all(patients[k]["split"] is not None for k in ids) else None
            row[key] = stratified_concordance([patients[k]["time"] for k in ids], [patients[k]["event"] for k in ids], [score[k] for k in ids],
                                              strata)
        rows.append(row)
    return rows


def read_burden_inputs(work: Path, seed: int, tag: str = "") -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """The inputs of :func:`burden_concordance` from a ``tasks`` run of the survival cohort in ``work``: the demo's
    manifest and each model's test risks of protocol seed ``seed`` (``evaluation/runs/<model>/split_<i>-<key>/predictions.json``;
    more than one run of a split, left by another configuration, is refused rather than guessed). Each slide's record
    gets its test ``split`` (the split folder's name), so that :func:`burden_concordance` compares within splits."""
    with (work / "data" / "manifest.csv").open() as f:
        slides = {r["slide_id"]: {"patient_id": r["patient_id"], "burden": int(r["label"]), "time": float(r["time"]),
                                  "event": int(r["event"])} for r in csv.DictReader(f)}
    risks: dict[str, dict[str, float]] = {}
    for model_dir in sorted((work / f"out-{tag}seed{seed}" / "evaluation" / "runs").iterdir()):
        files = sorted(f for f in model_dir.glob("split_*/predictions.json") if not f.parent.name.endswith(".partial"))
        splits = [f.parent.name.split("-")[0] for f in files]
        if len(set(splits)) != len(splits):
            raise SystemExit(f"{model_dir}: more than one run of a split; remove the stale ones")
        risks[model_dir.name] = {}
        for f, split in zip(files, splits):
            for sid, v in json.loads(f.read_text())["test"].items():
                risks[model_dir.name][sid] = float(v)
                if slides[sid].setdefault("split", split) != split:
                    raise SystemExit(f"{f}: slide {sid} is in {split} here and in {slides[sid]['split']} for another model; "
                                     "the models of one protocol seed must share its splits")
    return slides, risks


def lesion_coverage(work: Path, step_um: float | None = None) -> dict[str, float]:
    """Per slide of the demo cohort in ``work``: the largest fraction of one 20x patch that its lesion mask covers
    (0 without a lesion). Read from the tiling cache (``cache/tiles/*/meta.json`` of grid spacing ``step_um``: level-0
    patch centres, the slide's mpp, the finest scale and patch size) and ``data/masks/<slide folder>.png`` at the
    cohort's ``mask_mpp`` (``data/demo.json``). A non-overlapping grid cuts a lesion between up to four patches; this
    says how much of it the best-placed patch holds."""
    from PIL import Image

    from scripts.data.ids import folder_name

    mask_mpp = float(json.loads((work / "data" / "demo.json").read_text())["mask_mpp"])
    out: dict[str, float] = {}
    for meta_file in sorted((work / "cache" / "tiles").glob("*/meta.json")):
        meta = json.loads(meta_file.read_text())
        tiling = meta["tiling"]
        if tiling.get("step_um") != step_um:
            continue
        mask = np.asarray(Image.open(work / "data" / "masks" / f"{folder_name(meta['slide_id'])}.png")) > 0
        half = tiling["patch_size"] * tiling["scales_mpp"][0] / 2 / mask_mpp  # half a 20x patch, in mask pixels
        centres = np.load(meta_file.parent / "coords.npy") * float(meta["mpp"]) / mask_mpp
        best = 0.0
        for x, y in centres:
            y0, y1, x0, x1 = (int(round(v)) for v in (y - half, y + half, x - half, x + half))
            window = mask[max(y0, 0):y1, max(x0, 0):x1]
            best = max(best, float(window.sum()) / float((y1 - y0) * (x1 - x0)))
        out[meta["slide_id"]] = best
    return out


def coverage_effect(slides: dict[str, dict], risks: dict[str, dict[str, float]], coverage: dict[str, float]) -> dict[str, float]:
    """Spearman correlation, over the slides with one lesion, of the lesion's best-patch coverage
    (:func:`lesion_coverage`) and each model's risk: near 0 when the grid's cut through a lesion is not why a model
    misses it."""
    from scipy.stats import spearmanr

    one = [s for s, v in slides.items() if int(v["burden"]) == 1 and s in coverage]
    out = {}
    for name, by_slide in risks.items():
        ids = [s for s in one if s in by_slide]
        if len(ids) > 2:
            out[name] = float(spearmanr([coverage[s] for s in ids], [by_slide[s] for s in ids])[0])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks tasks", description=__doc__)
    ap.add_argument("--cohort", default="multiclass3", choices=sorted(TASK_COHORTS))
    ap.add_argument("--patients", type=int, default=90)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--seeds", default="0", help="comma-separated protocol seeds (--eval_seed)")
    ap.add_argument("--workers", type=int, default=2, help="eval_workers")
    ap.add_argument("--models", default="default", help="comma-separated, or 'default' (evaluate.yaml's eval_models)")
    ap.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples of the report")
    ap.add_argument("--workdir", default="outputs/bench-tasks", help="cohort, features and runs (reused when present)")
    ap.add_argument("--grid_step_um", type=float, default=None,
                    help="patch grid spacing (grid_step_um; default: the 20x patch, no overlap; 64: half-overlapping 20x patches)")
    ap.add_argument("--bag_per_cluster", type=int, default=None, help="bag slots per phenotype cluster (default: train.yaml's 8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve() / f"{args.cohort}-{args.patients}"
    models = [] if args.models == "default" else ["--eval_models", json.dumps(args.models.split(","))]
    tiling, tag = [], ""  # another grid or bag size: its own outputs (out-<tag>seed<s>); cohort and caches shared
    if args.grid_step_um is not None:
        tiling, tag = ["--grid_step_um", f"{args.grid_step_um:g}"], f"grid{args.grid_step_um:g}-"
    if args.bag_per_cluster is not None:
        tiling, tag = [*tiling, "--bag_per_cluster", str(args.bag_per_cluster)], f"{tag}bags{args.bag_per_cluster}-"
    t = time.perf_counter()
    reports = protocol_reports(work, [int(x) for x in args.seeds.split(",")], args.splits, args.workers, args.bootstrap,
                               [*cohort_overrides(args.cohort, args.patients), *models, *tiling], tag)
    rows, ratios = summarise(reports)
    print(f"cohort {args.cohort} ({args.patients} patients), {args.splits} splits x seeds {sorted(reports)}, "
          f"{(time.perf_counter() - t) / 60:.1f} min")
    if TASK_COHORTS[args.cohort].get("survival"):  # can the models count the lesions? (docs/evaluation.md)
        coverage = lesion_coverage(work, args.grid_step_um)
        for seed in sorted(reports):
            slides, risks = read_burden_inputs(work, seed, tag)
            burden = burden_concordance(slides, risks)
            print(f"seed {seed}: c-index on all patients and within pairs of lesion burdens")
            for r in burden:
                print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
            effect = coverage_effect(slides, risks, coverage)
            print(f"seed {seed}: one-lesion slides, Spearman rho of the lesion's best 20x patch coverage and the risk: "
                  + "  ".join(f"{k} {v:.2f}" for k, v in effect.items()))
    report("tasks", rows, ratios, args.json)
