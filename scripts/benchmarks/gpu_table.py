"""The extraction table of docs/performance.md on a GPU: end to end vs encoder only, per encoder, worker count and
torch.compile, in one run (every row is :mod:`scripts.benchmarks.extract` on the same generated slides).

    python -m scripts.benchmarks gpu_table --device cuda [--archs resnet50,uni] [--workers 4,12] [--json out.json]

Rows: ResNet-50 x 3 scales (the paper's encoders) and a ViT-L/16 foundation encoder (``uni``, random weights: the
rate does not depend on them), each at every worker count, torch.compile off and on (at the largest worker count).
Encoder-only is the bound of end to end; their ratio says how much of the slide reading the GPU hides. The first
line printed names the device. ``--quick`` runs a small version on the CPU (for checking the script itself).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from scripts.benchmarks import extract


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks gpu_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--archs", default="resnet50,uni")
    ap.add_argument("--workers", default="4,12")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--patches", type=int, default=512, help="patch positions per slide (2 slides)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--quick", action="store_true", help="a small CPU check of this script (tiny encoders, 2 patches per batch)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.archs, args.workers, args.batch_size, args.patches, args.no_compile = "cpu", "tiny,vit-test", "1", 4, 8, True
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# device: {name}; torch {torch.__version__}")
    workers = [int(w) for w in args.workers.split(",")]
    table = []
    work = Path(tempfile.mkdtemp(prefix="csmil-gpu-table-"))
    for arch in args.archs.split(","):
        runs = [(w, False) for w in workers] + ([] if args.no_compile else [(max(workers), True)])
        for w, comp in runs:
            out = work / f"{arch}-{w}-{int(comp)}.json"
            extract.main(["--device", args.device, "--arch", arch, "--batch-size", str(args.batch_size), "--num-workers", str(w),
                          "--patches", str(args.patches), "--workdir", str(work / "slides"), "--json", str(out)] + (["--compile"] if comp else []))
            rows = json.loads(out.read_text())["rows"]
            only = next(r["patches_per_s"] for r in rows if r["measure"].startswith("encoder only, all scales"))
            e2e = next(r["patches_per_s"] for r in rows if r["measure"].startswith("end to end"))
            table.append({"device": name, "arch": arch, "workers": w, "compile": comp, "batch": args.batch_size,
                          "encoder_only_pos_s": round(only, 1), "end_to_end_pos_s": round(e2e, 1), "efficiency": round(e2e / only, 3)})
    print("\n| device | encoder | workers | compile | batch | encoder only (positions/s) | end to end (positions/s) | end to end / encoder only |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['device']} | {r['arch']} | {r['workers']} | {'on' if r['compile'] else 'off'} | {r['batch']} | {r['encoder_only_pos_s']} | "
              f"{r['end_to_end_pos_s']} | {r['efficiency']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
