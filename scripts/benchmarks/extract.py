"""Feature-extraction efficiency: end-to-end patches/s (slide reading, transforms, encoders, store)
divided by encoder-only patches/s on in-memory tensors of the same batch size. 1.0 means I/O is fully
hidden behind the model."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd, Resized, ScaleIntensityRanged

from scripts.benchmarks.common import demo_cohort, report, timed
from scripts.data.manifest import read_manifest
from scripts.features.encoders import build_scale_encoders
from scripts.features.extraction import extract_cohort
from scripts.workflows.stages import prepare_cohort
from scripts.wsi.tiling import TilingParams
from scripts.wsi.transforms import LoadMultiScaleRegiond

SCALES = (0.5, 1.0, 2.0)
KEYS = ["scale_0", "scale_1", "scale_2"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks extract", description=__doc__)
    ap.add_argument("--arch", default="resnet18", help="encoder architecture (tiny, resnet18, resnet50)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--patches", type=int, default=64, help="patch positions per slide (2 slides)")
    ap.add_argument("--workdir", default=None, help="folder for the generated slides (default: temporary)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="csmil-bench-"))
    records = read_manifest(demo_cohort(work / "cohort"))
    tiling = TilingParams(scales_mpp=SCALES, max_patches=args.patches, seed=0)
    tiles = prepare_cohort(records, work / "cache", tiling, progress=False)["tiles"]
    n = sum(len(np.load(t / "coords.npy")) for t in tiles)
    chain = Compose([
        LoadMultiScaleRegiond(KEYS, SCALES, 256), Resized(KEYS, (256, 256), mode="area"),
        ScaleIntensityRanged(KEYS, 0, 255, 0.0, 1.0),
        NormalizeIntensityd(KEYS, subtrahend=[0.485, 0.456, 0.406], divisor=[0.229, 0.224, 0.225], channel_wise=True),
        EnsureTyped(KEYS, dtype=torch.float32, track_meta=False),
    ])
    encoders = [e.to(memory_format=torch.channels_last) for e in build_scale_encoders(args.arch, 3, seed=0)]
    x = torch.randn(args.batch_size, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    batches = int(np.ceil(n / args.batch_size))
    rows = []
    with torch.inference_mode():
        for e in encoders:
            e(x)  # warm-up
        per_scale = []
        for s, e in enumerate(encoders):
            t = timed(lambda: [e(x) for _ in range(max(1, batches // 2))])
            per_scale.append(max(1, batches // 2) * args.batch_size / t)
            rows.append({"measure": f"encoder only, scale {SCALES[s]} µm/px", "patches_per_s": per_scale[-1]})
    encoder_only = 1.0 / sum(1.0 / p for p in per_scale)  # three encoders per patch position
    rows.append({"measure": "encoder only, all scales (patch positions/s)", "patches_per_s": encoder_only})
    def end_to_end():  # a new store each time: nothing cached from an earlier run in the same --workdir
        extract_cohort(records, tiles, tempfile.mkdtemp(prefix="store-", dir=work), encoders, args.arch, chain, KEYS, {"bench": 1},
                       batch_size=args.batch_size, num_workers=args.num_workers, progress=False)

    t = timed(end_to_end)
    e2e = n / t
    rows.append({"measure": f"end to end, {args.num_workers} worker(s) (patch positions/s)", "patches_per_s": e2e})
    report("extract", rows, {"extract_efficiency": e2e / encoder_only}, args.json)
