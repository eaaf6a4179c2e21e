"""Training throughput: bags/s of every model of the registry (CS-MIL variants, the paper's Table-1 baselines, the
heads from the field) (forward + backward +
Adam step) on random features of the paper's size (D = 2048, 3 scales, 8 clusters x 8 instances, 4 bags
per step). Ratio baseline: the public reference code's CS-MIL variant (raw scale scores, flat attention)."""

from __future__ import annotations

import argparse

import torch

from scripts.benchmarks.common import add_random_bag_args, random_bags, report, timed
from scripts.mil.losses import MILLoss
from scripts.mil.registry import MODELS, build_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks train", description=__doc__)
    add_random_bag_args(ap, features=2048, steps=50)
    args = ap.parse_args(argv)
    k = 8
    x, mask, y = random_bags(args.batch, args.per_cluster, args.features, k)
    rows, rates = [], {}
    for name in MODELS:
        net = build_model(name, in_features=args.features, num_clusters=k)
        opt = torch.optim.Adam(net.parameters(), lr=5e-4, weight_decay=1e-4)
        loss_fn = MILLoss(net)  # CLAM-SB adds its instance loss, as in training

        def steps():
            for _ in range(args.steps):
                opt.zero_grad()
                loss_fn(net(x, mask), y).backward()
                opt.step()

        steps()  # warm-up
        rates[name] = args.steps * args.batch / timed(steps)
        rows.append({"model": name, "bags_per_s": rates[name], "parameters": sum(p.numel() for p in net.parameters())})
    base = rates["csmil_reference"]
    report("train", rows, {"csmil_vs_reference": rates["csmil"] / base, "csmil_vs_dsmil": rates["csmil"] / rates["dsmil"]}, args.json)
