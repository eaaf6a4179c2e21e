"""Cohort scaling: seconds per slide of prepare + extract for a small and a large generated cohort.

Generates ``--slides`` (default 200) small demo slides once, then runs the prepare and extract stages of the
bundle (fresh caches each time) on the first ``--small`` (default 50) slides and on all of them. Near-linear
cost means a flat time per slide: the ratio ``per_slide_large_vs_small`` should stay within 1 +- 0.2 (no
per-cohort overheads that grow with the number of slides: manifest checks, cache lookups, scheduling).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from scripts.benchmarks.common import report
from scripts.data.demo import DemoParams, generate_demo
from scripts.data.manifest import read_manifest, write_manifest
from scripts.workflows.pipeline_config import pipeline_parser


def _run_extract(manifest: Path, cache: Path) -> float:
    parser = pipeline_parser({"manifest": str(manifest), "dataset_dir": str(manifest.parent), "cache_dir": str(cache),
                              "demo_if_missing": False, "progress": False})
    t = time.perf_counter()
    entries = parser.get_parsed_content("extract")
    assert len(entries) == len(read_manifest(manifest, check_paths=False))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks scaling", description=__doc__)
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--small", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024, help="slide edge in pixels at 0.5 µm/px")
    ap.add_argument("--data", default="outputs/benchmarks/scaling_cohort", help="generated cohort (kept, reused)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    full = generate_demo(Path(args.data), DemoParams(num_patients=args.slides, size=args.size, seed=7), progress=True)
    records = read_manifest(full)
    small = full.parent / f"manifest_{args.small}.csv"
    write_manifest(small, records[: args.small])
    rows = []
    per_slide = {}
    for name, manifest, n in (("small", small, args.small), ("large", full, args.slides)):
        cache = Path(tempfile.mkdtemp(prefix=f"csmil-scaling-{name}-"))
        try:
            seconds = _run_extract(manifest, cache)
            patches = sum(int(p.stat().st_size > 0) for p in (cache / "features").glob("*/features.npy"))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        per_slide[name] = seconds / n
        rows.append({"cohort": name, "slides": n, "entries": patches, "seconds": seconds, "s_per_slide": seconds / n})
    report("scaling", rows, {"per_slide_large_vs_small": per_slide["large"] / per_slide["small"]}, args.json)
