"""Slide inference cost for two (or more) slide sizes: wall time and peak resident memory of the whole
``run inference`` command (tiling, features, clusters, prediction, maps) in a fresh process per slide.
Memory must stay flat as slides grow (patches are streamed); time should grow with the patch count."""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

from scripts.benchmarks.common import large_slide, report, run_child
from scripts.features.encoders import feature_dim
from scripts.mil.networks import CSMIL

ROOT = Path(__file__).resolve().parents[2]
_LAUNCH = (  # VmHWM: peak RSS of this program only (ru_maxrss would include the parent's RSS at fork time)
    "import runpy, sys\n"
    "sys.argv = ['monai.bundle'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('monai.bundle', run_name='__main__')\n"
    "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
    "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "print('PEAK_RSS_KB', hwm, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks infer", description=__doc__)
    ap.add_argument("--sizes", default="2560,7680,12800", help="level-0 edges (px) of the generated slides (ratios: largest vs smallest)")
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="csmil-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "model.pt"
    torch.save(CSMIL(in_features=feature_dim(args.arch)).state_dict(), ckpt)
    rows, res = [], {}
    for size in [int(s) for s in args.sizes.split(",")]:
        slide = large_slide(work / f"slide_{size}.tif", size, (1, 2, 4, 8), seed=7)
        out = work / f"out_{size}"
        t = time.perf_counter()
        r = run_child(
            [sys.executable, "-c", _LAUNCH, "run", "inference", "--config_file", "configs/inference.yaml", "--input", str(slide),
             "--output_dir", str(out), "--ckpt_path", str(ckpt), "--encoder_arch", args.arch, "--mil_model", "csmil", "--progress", "False"],
            ROOT,
        )
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        peak = int([line for line in r.stderr.splitlines() if line.startswith("PEAK_RSS_KB")][-1].split()[1]) / 1024
        n = int(next(csv.DictReader(open(out / "predictions.csv")))["num_patches"])
        res[size] = (wall, peak, n)
        rows.append({"slide_px": f"{size}x{size}", "patches": n, "wall_s": wall, "s_per_1k_patches": 1000 * wall / n, "peak_rss_mb": peak})
    small, large = min(res), max(res)  # ratios: largest vs smallest slide
    report("infer", rows, {
        "peak_rss_large_vs_small": res[large][1] / res[small][1],
        "patches_large_vs_small": res[large][2] / res[small][2],
        "time_per_patch_large_vs_small": (res[large][0] / res[large][2]) / (res[small][0] / res[small][2]),
    }, args.json)
