"""Wall time of the whole evaluation protocol (splits x models) on the demo cohort's features.

Baseline measured in the same run: one training run of CS-MIL on one split (what `run training` costs once
features exist). The ratio ``protocol_vs_runs`` = protocol wall time / (number of runs x one run) shows the
protocol's own overhead (parsing, bag scoring of 100 bags per test slide, statistics, figures); ~1 is ideal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


from scripts.benchmarks.common import report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks evaluate", description=__doc__)
    ap.add_argument("--dataset_dir", default="data/demo", help="demo cohort (generated there when missing)")
    ap.add_argument("--cache_dir", default="outputs/cache", help="feature store shared with `run training`")
    ap.add_argument("--splits", type=int, default=10)
    ap.add_argument("--models", default="all", help="comma-separated model names, or 'all' (the pipeline config's eval_models)")
    ap.add_argument("--max_epochs", type=int, default=None, help="override configs/train.yaml max_epochs")
    ap.add_argument("--workers", type=int, default=1, help="evaluation worker processes (eval_workers)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from scripts.evaluation import workflow
    from scripts.evaluation.protocol import Variant, _quiet, run_one
    from scripts.workflows.pipeline_config import EVALUATE_CONFIG, PIPELINE_CONFIG, pipeline_parser
    from scripts.workflows.splits import protocol_splits

    overrides = {"dataset_dir": args.dataset_dir, "cache_dir": args.cache_dir, "progress": False}
    if args.max_epochs:
        overrides["max_epochs"] = args.max_epochs
    parser = pipeline_parser(overrides, [PIPELINE_CONFIG, EVALUATE_CONFIG])
    entries = parser.get_parsed_content("datalist")  # builds the features once (not timed)
    models = parser.get_parsed_content("eval_models") if args.models == "all" else args.models.split(",")
    config = parser.get()
    out = Path(tempfile.mkdtemp(prefix="csmil-eval-bench-"))
    try:
        ids = [e.slide_id for e in entries]
        split = protocol_splits(ids, [e.patient_id for e in entries], [e.label for e in entries], args.splits)[0]
        by_id = {e.slide_id: e for e in entries}
        t = time.perf_counter()
        with _quiet(True):
            run_one(config, Variant("csmil", "csmil"), {k: [by_id[i] for i in v] for k, v in split.items()}, out / "single", 100, 0)
        one = time.perf_counter() - t
        t = time.perf_counter()
        workflow.evaluate(config, entries, out / "protocol", models, num_splits=args.splits, progress=True, workers=args.workers)
        total = time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)
    n_runs = len(models) * args.splits
    rows = [
        {"what": "one training run (csmil, 1 split)", "runs": 1, "seconds": one},
        {"what": f"protocol ({args.splits} splits x {len(models)} models + report, {args.workers} worker(s))", "runs": n_runs, "seconds": total},
    ]
    report("evaluate", rows, {"protocol_vs_runs": total / (n_runs * one), "protocol_minutes": total / 60, "cpu_count": float(os.cpu_count() or 1)}, args.json)
