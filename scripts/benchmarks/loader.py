"""Slide loader throughput without an encoder: positions per second that W loader workers deliver to the main
process through the bundle's own patch chain (the ``preprocessing`` of configs/train.yaml), against W x the rate
of the same chain in one process.

    loader (0.13): scripts.features.patch_loader - workers own whole cells and hand over uint8 batches
                   (the intensity transforms run on the encoder's device, not here)
    map-style float (0.12, the baseline, measured in the same run): a MONAI Dataset + DataLoader over items,
                   the whole chain in the workers, batches dealt round-robin, float32 through shared memory

    ratios: loader_scaling = (positions/s with W workers) / (W x positions/s in one process), 0.13 loader
            baseline_scaling = the same for the 0.12 loader
            bytes_per_position = what one position costs to hand from a worker to the main process (0.13)

Each row also shows the CPU seconds of the pass (main process and workers) and the cores busy on average:
``W x one process`` assumes the one-process run uses one core, but torch parallelises the batch stacking there
(workers run torch single-threaded), so on a machine with W cores the ratio is bounded below 1 by that.

The target of issue 16 is loader_scaling >= 0.8 with W = 2 on a 2-core machine (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset

from scripts.benchmarks.common import large_slide, report
from scripts.data.manifest import SlideRecord
from scripts.features.device_preprocessing import split_transform
from scripts.features.patch_loader import CellDealtPatches, loader_slide, patch_loader


def _items(tiles: list[Path], records: list[SlideRecord]) -> list[dict]:
    """Loader items as the 0.12 extraction built them (one dict per position)."""
    items = []
    for si, (rec, tdir) in enumerate(zip(records, tiles)):
        mpp = float(json.loads((tdir / "meta.json").read_text())["mpp"])
        items += [{"path": rec.path, "centre": c.astype(np.float32), "mpp": mpp, "mpp_force": True, "slide_index": si}
                  for c in np.load(tdir / "coords.npy")]
    return items


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _drain(loader) -> tuple[float, int, float]:
    """Positions/s, bytes per position and CPU seconds (this process and its finished workers) of one pass."""
    n, nbytes = 0, 0
    t, cpu = time.perf_counter(), _cpu_s()
    for batch in loader:
        b = len(batch["slide_index"])
        n += b
        nbytes += sum(v.element_size() * v.nelement() for k, v in batch.items() if k.startswith("scale_") and isinstance(v, torch.Tensor))
    wall = time.perf_counter() - t
    del loader  # workers end, so their CPU time is counted
    return n / wall, nbytes // max(1, n), _cpu_s() - cpu


def _rate_baseline(items: list[dict], transform, workers: int, batch_size: int) -> tuple[float, int, float]:
    """Positions per second of the 0.12 loader, and bytes per position of its batches."""
    return _drain(DataLoader(Dataset(items, transform), batch_size=batch_size, num_workers=workers, shuffle=False))


def _rate(slides: list[dict], transform, workers: int, batch_size: int) -> tuple[float, int, float]:
    """Positions per second of the 0.13 loader, and bytes per position of its batches."""
    worker_transform, _ = split_transform(transform)
    return _drain(patch_loader(CellDealtPatches(slides, worker_transform, [f"scale_{i}" for i in range(3)], batch_size), workers, False))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks loader", description=__doc__)
    ap.add_argument("--workers", type=int, default=2, help="W")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096, help="level-0 edge of each generated slide (px, 0.5 µm/px)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from scripts.workflows.pipeline_config import pipeline_parser

    work = Path(args.workdir or tempfile.mkdtemp(prefix="csmil-bench-loader-"))
    paths = [large_slide(work / f"slide_{i}.tif", args.size, (1, 2, 4, 8), seed=i) for i in range(args.slides)]
    records = [SlideRecord(f"s{i}", f"p{i}", str(p), 0) for i, p in enumerate(paths)]
    parser = pipeline_parser({"cache_dir": str(work / "cache"), "output_dir": str(work / "out"), "progress": False})
    tiles = parser.get_parsed_content("prepare_slides")(records)["tiles"]  # not timed
    items, slides = _items(tiles, records), [loader_slide(r.path, t) for r, t in zip(records, tiles)]
    transform = lambda: pipeline_parser().get_parsed_content("preprocessing")  # noqa: E731 - a fresh chain (fresh reader cache) per run
    one, per_pos, one_cpu = _rate(slides, transform(), 0, args.batch_size)
    many, _, many_cpu = _rate(slides, transform(), args.workers, args.batch_size)
    b_one, b_per_pos, b_one_cpu = _rate_baseline(items, transform(), 0, args.batch_size)
    b_many, _, b_many_cpu = _rate_baseline(items, transform(), args.workers, args.batch_size)
    n = len(items)
    row = lambda name, rate, per, cpu: {"loader": name, "positions": n, "positions_per_s": rate, "MB_per_position": per / 2**20,  # noqa: E731
                                        "cpu_s": cpu, "cores_busy": cpu * rate / n}
    rows = [
        row("0.13 one process", one, per_pos, one_cpu),
        row(f"0.13 {args.workers} workers (cells, uint8)", many, per_pos, many_cpu),
        row("0.12 one process", b_one, b_per_pos, b_one_cpu),
        row(f"0.12 {args.workers} workers (batches, float32)", b_many, b_per_pos, b_many_cpu),
    ]
    report("loader", rows, {"loader_scaling": many / (args.workers * one), "baseline_scaling": b_many / (args.workers * b_one),
                            "bytes_per_position": float(per_pos)}, args.json)


if __name__ == "__main__":
    main()
