"""Training throughput: bags/s of CS-MIL variants (forward + backward + Adam step) on random features
of the paper's size (D = 2048, 3 scales, 8 clusters x 8 instances, 4 bags per step). Baseline: the public
reference code's variant (raw scale scores, one flat instance attention)."""

from __future__ import annotations

import argparse

import torch

from scripts.benchmarks.common import report, timed
from scripts.mil.networks import CSMIL

VARIANTS = {
    "reference (flat, raw scale scores)": dict(pooling="flat", scale_softmax=False),
    "CS-MIL paper (shared kernel, ReLU, hierarchical)": dict(),
    "CS-MIL non-shared kernel, Tanh": dict(share_scale_kernel=False, scale_activation="tanh"),
    "CS-MIL per-cluster MI-FCN": dict(share_instance_encoder=False),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks train", description=__doc__)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--per-cluster", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    k = 8
    x = torch.randn(args.batch, 3, k * args.per_cluster, args.features)
    mask = torch.ones(args.batch, k * args.per_cluster, dtype=torch.bool)
    y = torch.randint(0, 2, (args.batch,))
    rows, rates = [], {}
    for name, kw in VARIANTS.items():
        net = CSMIL(in_features=args.features, num_clusters=k, **kw)
        opt = torch.optim.Adam(net.parameters(), lr=5e-4, weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def steps():
            for _ in range(args.steps):
                opt.zero_grad()
                loss_fn(net(x, mask), y).backward()
                opt.step()

        steps()  # warm-up
        rates[name] = args.steps * args.batch / timed(steps)
        rows.append({"model": name, "bags_per_s": rates[name]})
    base = rates["reference (flat, raw scale scores)"]
    report("train", rows, {"csmil_vs_reference": rates["CS-MIL paper (shared kernel, ReLU, hierarchical)"] / base}, args.json)
