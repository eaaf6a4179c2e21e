"""Feature-extraction efficiency on a device: end-to-end patch positions/s (slide reading, uint8 hand-over,
on-device preprocessing, three encoders, store) divided by encoder-only positions/s on uint8 batches already
on the device (same batch size, same encoders with their preprocessing layer; bf16 autocast and channels-last on
CUDA, as extraction runs them). 1.0 means reading is fully hidden behind the model.

    python -m scripts.benchmarks extract [--device cuda] [--arch resnet50 | uni | h-optimus-0 ...] [--num-workers 12]
        [--batch-size 128] [--compile]

A foundation encoder by name runs with random weights (the rate does not depend on them; nothing is downloaded).
``--compile`` wraps each encoder in ``torch.compile`` (the first batches pay the compilation, outside the timing).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from contextlib import nullcontext

import numpy as np
import torch

from scripts.benchmarks.common import demo_cohort, report, timed
from scripts.data.manifest import read_manifest
from scripts.features.device_preprocessing import with_preprocessing
from scripts.features.encoders import build_scale_encoders
from scripts.features.extraction import extract_cohort
from scripts.workflows.stages import prepare_cohort
from scripts.wsi.tiling import TilingParams

SCALES = (0.5, 1.0, 2.0)
KEYS = ["scale_0", "scale_1", "scale_2"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks extract", description=__doc__)
    ap.add_argument("--arch", default="resnet18", help="encoder architecture (tiny, resnet18, resnet50, or a foundation encoder name)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each encoder")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
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
    from scripts.workflows.pipeline_config import pipeline_parser

    chain = pipeline_parser().get_parsed_content("preprocessing")  # the config's patch chain (256 px, three scales)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    from scripts.features.foundation import is_named_encoder

    weights = "random" if is_named_encoder(args.arch) else None
    encoders = [e.to(device).eval().to(memory_format=torch.channels_last)
                for e in with_preprocessing(build_scale_encoders(args.arch, 3, weights, seed=0), chain)]
    if args.compile:
        encoders = [torch.compile(e) for e in encoders]
    x = torch.randint(0, 256, (args.batch_size, 3, 256, 256), dtype=torch.uint8, device=device).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    batches = int(np.ceil(n / args.batch_size))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    with torch.inference_mode(), autocast:
        for e in encoders:
            e(x)  # warm-up
        sync()
        per_scale = []
        for s, e in enumerate(encoders):
            reps = max(3, batches // 2)
            t = timed(lambda: ([e(x) for _ in range(reps)], sync()))
            per_scale.append(reps * args.batch_size / t)
            rows.append({"measure": f"encoder only, scale {SCALES[s]} µm/px", "patches_per_s": per_scale[-1]})
    encoder_only = 1.0 / sum(1.0 / p for p in per_scale)  # three encoders per patch position
    rows.append({"measure": f"encoder only, all scales (patch positions/s, {device.type})", "patches_per_s": encoder_only})

    def end_to_end():  # a new store each time: nothing cached from an earlier run in the same --workdir
        extract_cohort(records, tiles, tempfile.mkdtemp(prefix="store-", dir=work), encoders, args.arch, chain, KEYS, {"bench": 1},
                       batch_size=args.batch_size, num_workers=args.num_workers, device=device, progress=False)

    t = timed(end_to_end)
    e2e = n / t
    rows.append({"measure": f"end to end, {args.num_workers} worker(s) (patch positions/s)", "patches_per_s": e2e})
    for r in rows:
        r.update(arch=args.arch, compile=bool(args.compile), batch_size=args.batch_size, num_workers=args.num_workers)
    report("extract", rows, {"extract_efficiency": e2e / encoder_only}, args.json)
