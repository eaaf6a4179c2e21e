"""Cohort planner: patches per slide and scale, feature-store size and the wall time of extraction.

    python -m scripts.plan --manifest /data/cohort/manifest.csv [--gpus 8] [--encoder_arch resnet50 | uni | enc.ts] \
        [--device cuda] [--patches_per_s 400] [--cache_dir outputs/cache] [--csv plan.csv]

It runs the (cached, cheap) prepare stage of the pipeline config (configs/train.yaml) - tissue detection on a thumbnail and
the patch grid - with the given manifest, so the counts are the ones extraction will encode. Storage is
float16 features [N, S, D] plus coordinates; wall time = patches / (patches_per_s x gpus), where
``patches_per_s`` is the multi-scale patch-position rate of one device. Without ``--patches_per_s`` the planner
probes the chosen encoder (built-in or an exported file, with its preprocessing layer, bf16 on CUDA) on
``--device`` on uint8 batches: the encoders' own rate, an upper bound of end to end (``python -m
scripts.benchmarks extract`` measures both; extraction reached 0.98 of it on the CPU, docs/performance.md).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np

from scripts.features.encoders import feature_dim

logger = logging.getLogger(__name__)


def plan_rows(records, tiles_dirs, num_scales: int, dim: int, stain_views: int = 0) -> list[dict]:
    """One row per slide: patches (= per scale, co-centred) and feature-store bytes (with ``stain_views`` stain
    views of MIL training, :mod:`scripts.features.stain_views`, each as large as the features)."""
    rows = []
    for rec, tdir in zip(records, tiles_dirs):
        n = int(np.load(Path(tdir) / "coords.npy", mmap_mode="r").shape[0])
        rows.append({"slide_id": rec.slide_id, "patches_per_scale": n, "patches_all_scales": n * num_scales,
                     "store_bytes": (1 + stain_views) * n * num_scales * dim * 2 + n * 16 + 4096})
    return rows


def summarise(rows: list[dict], patches_per_s: float, gpus: int, extrapolate: int = 10_000, stain_views: int = 0) -> dict:
    """Totals, the per-10,000-slide extrapolation and the estimated extraction wall time (every stain view is one
    more encoder pass over the slide)."""
    n = sum(r["patches_per_scale"] for r in rows)
    size = sum(r["store_bytes"] for r in rows)
    seconds = (1 + stain_views) * n / (patches_per_s * gpus) if rows else 0.0
    per_slide = size / max(len(rows), 1)
    return {"slides": len(rows), "patches_per_scale": n, "store_gb": size / 1e9, "store_gb_per_10k_slides": per_slide * extrapolate / 1e9,
            "hours": seconds / 3600, "gpus": gpus, "patches_per_s_per_gpu": patches_per_s}


def probe_rate(encoder_arch: str, num_scales: int, device: str = "cpu", batch_size: int = 16, patch_size: int = 256,
               repeats: int = 2) -> float:
    """Patch positions per second of the ``num_scales`` encoders of ``encoder_arch`` on ``device`` (uint8 batches
    through each encoder's preprocessing layer; bf16 autocast and channels-last on CUDA, as extraction runs)."""
    import time
    from contextlib import nullcontext

    import torch

    from scripts.features.device_preprocessing import PatchNormalize, PreprocessedEncoder, includes_preprocessing
    from scripts.features.encoders import build_scale_encoders

    from scripts.features.foundation import is_named_encoder

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    weights = "random" if is_named_encoder(encoder_arch) else None  # the rate does not depend on the weights
    encoders = [(e if includes_preprocessing(e) else PreprocessedEncoder(PatchNormalize((0, 255, 0, 1)), e)).to(dev).eval()
                .to(memory_format=torch.channels_last) for e in build_scale_encoders(encoder_arch, num_scales, weights, patch_size=patch_size)]
    x = torch.randint(0, 256, (batch_size, 3, patch_size, patch_size), dtype=torch.uint8, device=dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seconds = 0.0
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
        for e in encoders:
            e(x)  # warm-up
            sync()
            t = time.perf_counter()
            for _ in range(repeats):
                e(x)
            sync()
            seconds += (time.perf_counter() - t) / (repeats * batch_size)
    return 1.0 / seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--cache_dir", default="outputs/cache", help="where tiles are cached (shared with the stages)")
    ap.add_argument("--encoder_arch", default="resnet50", help="tiny | resnet18 | resnet50 | a foundation encoder name (uni, virchow2, ...) | an exported encoder file "
                    "(sets the feature size and, when probed, the rate)")
    ap.add_argument("--device", default="cpu", help="device the probe runs the encoders on (cpu, cuda)")
    ap.add_argument("--scales_mpp", default="[0.5, 1.0, 2.0]")
    ap.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for slides without it")
    ap.add_argument("--patches_per_s", type=float, default=None, help="multi-scale patch positions per second of one device "
                    "(default: probe the encoder on --device)")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--stain_views", type=int, default=0, help="stain views of MIL training per slide (configs/train.yaml stain_views)")
    ap.add_argument("--csv", default=None, help="write the per-slide table here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import scripts.excepthook  # noqa: F401  (one-line errors)
    from scripts.workflows.pipeline_config import pipeline_parser

    manifest = Path(args.manifest).resolve()
    overrides = {"manifest": str(manifest), "dataset_dir": str(manifest.parent), "cache_dir": args.cache_dir,
                 "demo_if_missing": False, "progress": True, "scales_mpp": eval(args.scales_mpp, {}), "mpp": args.mpp}  # noqa: S307
    prepared = pipeline_parser(overrides).get_parsed_content("prepare")
    scales = overrides["scales_mpp"]
    rows = plan_rows(prepared["records"], prepared["tiles"], len(scales), feature_dim(args.encoder_arch), args.stain_views)
    rate_source = "given"
    if args.patches_per_s is None:
        args.patches_per_s = probe_rate(args.encoder_arch, len(scales), args.device)
        rate_source = f"probed on {args.device}, encoders only"
    s = summarise(rows, args.patches_per_s, args.gpus, stain_views=args.stain_views)
    out = sys.stdout
    out.write(f"{'slide_id':<32} {'patches/scale':>14} {'store MB':>10}\n")
    for r in rows:
        out.write(f"{r['slide_id']:<32} {r['patches_per_scale']:>14d} {r['store_bytes'] / 1e6:>10.1f}\n")
    out.write(
        f"total: {s['slides']} slides, {s['patches_per_scale']} patches per scale x {len(scales)} scales "
        f"({args.encoder_arch}, D={feature_dim(args.encoder_arch)}{f', {args.stain_views} stain views' if args.stain_views else ''}), feature store {s['store_gb']:.2f} GB "
        f"({s['store_gb_per_10k_slides']:.0f} GB per 10,000 such slides); extraction about {s['hours']:.2f} h on "
        f"{args.gpus} GPU(s) at {args.patches_per_s:.4g} patches/s each ({rate_source})\n"
    )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["slide_id"])
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    from scripts.interrupts import install_interrupt_handlers

    install_interrupt_handlers()  # Ctrl-C: one line, exit 130
    raise SystemExit(main())
