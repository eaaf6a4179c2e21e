"""Slide loader throughput without an encoder: positions per second that W DataLoader workers deliver to the
main process through the bundle's own patch chain (the ``preprocessing`` of configs/train.yaml, items as
extraction builds them), against W x the rate of the same chain in one process.

    ratios: loader_scaling = (positions/s with W workers) / (W x positions/s in one process)
            bytes_per_position = what one position costs to hand from a worker to the main process

The target of issue 16 is loader_scaling >= 0.8 with W = 2 on a 2-core machine; this benchmark measures the
loader as it is (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset

from scripts.benchmarks.common import large_slide, report
from scripts.data.manifest import SlideRecord


def _items(tiles: list[Path], records: list[SlideRecord]) -> list[dict]:
    """Loader items as :func:`scripts.features.extraction.extract_cohort` builds them."""
    items = []
    for si, (rec, tdir) in enumerate(zip(records, tiles)):
        mpp = float(json.loads((tdir / "meta.json").read_text())["mpp"])
        items += [{"path": rec.path, "centre": c.astype(np.float32), "mpp": mpp, "mpp_force": True, "slide_index": si}
                  for c in np.load(tdir / "coords.npy")]
    return items


def _rate(items: list[dict], transform, workers: int, batch_size: int) -> tuple[float, int]:
    """Positions per second delivered to this process, and bytes per position of the delivered batches."""
    loader = DataLoader(Dataset(items, transform), batch_size=batch_size, num_workers=workers, shuffle=False)
    n, nbytes = 0, 0
    t = time.perf_counter()
    for batch in loader:
        b = len(batch["slide_index"])
        n += b
        nbytes += sum(v.element_size() * v.nelement() for k, v in batch.items() if k.startswith("scale_") and isinstance(v, torch.Tensor))
    return n / (time.perf_counter() - t), nbytes // max(1, n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks loader", description=__doc__)
    ap.add_argument("--workers", type=int, default=2, help="W")
    ap.add_argument("--slides", type=int, default=4)
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
    items = _items(tiles, records)
    one, per_pos = _rate(items, parser.get_parsed_content("preprocessing"), 0, args.batch_size)
    many, _ = _rate(items, pipeline_parser().get_parsed_content("preprocessing"), args.workers, args.batch_size)
    rows = [
        {"loader": "one process (grouped reads)", "positions": len(items), "positions_per_s": one, "MB_per_position": per_pos / 2**20},
        {"loader": f"{args.workers} workers", "positions": len(items), "positions_per_s": many, "MB_per_position": per_pos / 2**20},
    ]
    report("loader", rows, {"loader_scaling": many / (args.workers * one), "bytes_per_position": float(per_pos)}, args.json)


if __name__ == "__main__":
    main()
