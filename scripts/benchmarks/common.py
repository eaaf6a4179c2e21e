"""Shared helpers of the benchmarks: a generated cohort, a result table, the ratios line, JSON output."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from scripts.data.demo import DemoParams, generate_demo, render_slide
from scripts.wsi.pyramid import write_pyramid


def demo_cohort(root: Path, num_slides: int = 2, size: int = 2560) -> Path:
    """Manifest of a small generated cohort (cached in ``root``)."""
    return generate_demo(root, DemoParams(num_patients=num_slides, size=size, seed=123), progress=False)


def large_slide(path: Path, size: int, downsamples: tuple[int, ...], seed: int) -> Path:
    """A ``size`` x ``size`` JPEG pyramid at 0.5 µm/px tiled from one positive demo slide (cached at ``path``)."""
    if path.is_file():
        return path
    img, _, _ = render_slide(1, DemoParams(size=2560), np.random.default_rng(seed))
    reps = -(-size // img.shape[0])
    return write_pyramid(path, np.tile(img, (reps, reps, 1))[:size, :size], mpp=0.5, downsamples=downsamples)


def run_child(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that takes its child down with it: a SIGTERM to the
    benchmark (``kill PID``) or an exception ends the child too, instead of leaving a bundle command training alone."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _term(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _term) if main else None
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if main:
            signal.signal(signal.SIGTERM, before)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def add_random_bag_args(ap, features: int, steps: int, features_help: str | None = None) -> None:
    """The options of the benchmarks that time steps on :func:`random_bags` (``--features``, ``--batch``,
    ``--per-cluster``, ``--steps``) and ``--json``."""
    ap.add_argument("--features", type=int, default=features, help=features_help)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--per-cluster", type=int, default=8)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--json", default=None)


def random_bags(batch: int, per_cluster: int, features: int, clusters: int = 8):
    """Seeded random training bags of the benchmarks' size: features ``[batch, 3 scales, clusters x per_cluster,
    features]``, an all-true mask and binary labels (``torch.manual_seed(0)`` first, so every benchmark draws the same)."""
    import torch

    torch.manual_seed(0)
    n = clusters * per_cluster
    return torch.randn(batch, 3, n, features), torch.ones(batch, n, dtype=torch.bool), torch.randint(0, 2, (batch,))


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def report(name: str, rows: list[dict], ratios: dict[str, float], json_path: str | None = None) -> None:
    """Print a table of ``rows`` (columns: every key of any row, '-' where a row has none) and the ratios line;
    optionally write everything as JSON."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    widths = [max(len(c), *(len(_fmt(r.get(c, "-"))) for r in rows)) for c in cols]
    print(f"# benchmark: {name}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "-")).ljust(w) for c, w in zip(cols, widths)))
    if json_path:
        Path(json_path).write_text(json.dumps({"benchmark": name, "rows": rows, "ratios": ratios}, indent=2))
    print("ratios: " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def protocol_command(work: Path, seed: int, splits: int, workers: int, bootstrap: int, overrides: list[str], tag: str = "",
                     reference: str = "csmil_joint") -> list[str]:
    """The ``run evaluate`` command line of one protocol seed (outputs in ``<work>/out-<tag>seed<seed>``)."""
    import sys

    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']",
            "--dataset_dir", str(work / "data"), "--output_dir", str(work / f"out-{tag}seed{seed}"), "--cache_dir", str(work / "cache"),
            "--progress", "False", "--eval_seed", str(seed), "--eval_num_splits", str(splits), "--eval_workers", str(workers),
            "--eval_reference", reference, "--eval_bootstrap_resamples", str(bootstrap), *overrides]


def protocol_reports(work: Path, seeds: list[int], splits: int, workers: int, bootstrap: int, overrides: list[str],
                     tag: str = "", reference: str = "csmil_joint") -> dict[int, dict]:
    """``run evaluate`` (train.yaml + evaluate.yaml; ``reference``: the model the others are compared with, one of the
    evaluated models) on the cohort in ``work`` once per protocol seed, with ``overrides`` (cohort, task, models);
    returns each seed's ``report.json`` (outputs in ``out-<tag>seed<seed>``; the cohort and the caches are shared by
    every tag)."""
    root = Path(__file__).resolve().parents[2]
    t = time.perf_counter()
    reports = {}
    for seed in seeds:
        out = work / f"out-{tag}seed{seed}"
        cmd = protocol_command(work, seed, splits, workers, bootstrap, overrides, tag, reference)
        r = run_child(cmd, root)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        reports[seed] = json.loads((out / "report" / "report.json").read_text())
        print(f"seed {seed}: report {out / 'report' / 'report.md'} ({(time.perf_counter() - t) / 60:.1f} min so far)")
    return reports
