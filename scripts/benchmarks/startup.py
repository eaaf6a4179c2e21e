"""Start-up cost of a bundle command: ``run inference`` on one small, already cached slide (tiles, features and
clusters reused), in a fresh process, against ``python -c "import monai, torch"`` measured in the same run.

    ratios: startup_overhead = (wall of run inference - its prediction time) / wall of the bare import

Target <= 1.5 (docs/performance.md). The command also reports how often each YAML file was read (once each is
the contract: one parse per command, docs/configuration.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scripts.benchmarks.common import demo_cohort, report

ROOT = Path(__file__).resolve().parents[2]
#: runs the bundle CLI as `python -m monai.bundle` would, counting config-file reads; at exit prints
#: ``CONFIG_READS {json}`` and ``MODULES [json]`` (the modules imported) on stderr (also used by tests)
LAUNCH = (
    "import collections, json, runpy, sys\n"
    "from monai.bundle.config_parser import ConfigParser\n"
    "reads = collections.Counter()\n"
    "_load = ConfigParser.load_config_file.__func__\n"
    "def load(cls, filepath, **kw):\n"
    "    reads[str(filepath)] += 1\n"
    "    return _load(cls, filepath, **kw)\n"
    "ConfigParser.load_config_file = classmethod(load)\n"
    "sys.argv = ['monai.bundle'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('monai.bundle', run_name='__main__')\n"
    "finally:\n    print('CONFIG_READS', json.dumps(reads), 'MODULES', json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
)


def launch_report(stderr: str) -> tuple[dict, list]:
    """(config reads per file, imported modules) from the stderr of a :data:`LAUNCH` run."""
    line = [x for x in stderr.splitlines() if x.startswith("CONFIG_READS")][-1]
    reads, modules = line[len("CONFIG_READS "):].split(" MODULES ")
    return json.loads(reads), json.loads(modules)


def _wall(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return wall, r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks startup", description=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command (median reported)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="csmil-bench-startup-"))
    manifest = demo_cohort(work / "demo", num_slides=1, size=1536)
    from scripts.mil.registry import build_model
    from scripts.workflows.pipeline_config import pipeline_parser

    parser = pipeline_parser()
    torch.save(build_model(parser.get_parsed_content("mil_model"), in_features=128).state_dict(), work / "model.pt")  # tiny encoder: 128-d
    cmd = [sys.executable, "-c", LAUNCH, "run", "inference", "--config_file", "configs/inference.yaml",
           "--input", str(manifest.parent), "--ckpt_path", str(work / "model.pt"), "--cache_dir", str(work / "cache"),
           "--progress", "False"]
    _wall(cmd + ["--output_dir", str(work / "warm")])  # builds the cache (not timed)
    bare, runs = [], []
    for i in range(args.repeat):
        bare.append(_wall([sys.executable, "-c", "import monai, torch"])[0])
        wall, r = _wall(cmd + ["--output_dir", str(work / f"out{i}")])
        rows = list(csv.DictReader(open(work / f"out{i}" / "predictions.csv")))
        predict = sum(float(row["predict_seconds"]) for row in rows)
        reads, _ = launch_report(r.stderr)
        runs.append((wall, predict, reads))
    b = statistics.median(bare)
    wall = statistics.median(w for w, _, _ in runs)
    predict = statistics.median(p for _, p, _ in runs)
    reads = runs[-1][2]
    rows = [
        {"what": 'python -c "import monai, torch"', "seconds": b, "detail": ""},
        {"what": "run inference (cached slide), wall", "seconds": wall, "detail": ""},
        {"what": "  of which prediction", "seconds": predict, "detail": "predict_seconds in predictions.csv"},
        {"what": "  overhead (wall - prediction)", "seconds": wall - predict, "detail": ""},
        {"what": "config files read", "seconds": float("nan"), "detail": json.dumps(reads)},
    ]
    most = max(reads.values()) if reads else 0
    report("startup", rows, {"startup_overhead": (wall - predict) / b, "max_reads_per_config_file": float(most)}, args.json)


if __name__ == "__main__":
    main()
