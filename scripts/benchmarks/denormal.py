"""Denormal floats on the CPU: training steps (forward + backward + Adam) and inference forwards of a model whose
weights hold denormals, with ``flush_denormal`` off and on (``torch.set_flush_denormal``), plus the same model with
its denormals set to zero (what flushing makes of them).

Why: under the shared recipe MONAI's ``att_trans`` heads collapse and about 2 % of their weights decay into
denormals (|x| < 1.2e-38; measured on the co-location cohorts, docs/performance.md). x86 CPUs handle those in
microcode, so every matrix product touching them slows down. The benchmark reproduces that state on random
features: a freshly built model with ``--fraction`` of every weight matrix's entries set to random denormals.
Ratio baseline: the same model and steps with ``flush_denormal`` off, measured in the same run. Run it with
``OMP_NUM_THREADS=1``: it switches flushing between rows, which reaches the calling thread only once torch's thread
pool exists (the bundle sets it before the pool starts, so its threads inherit it).
"""

from __future__ import annotations

import argparse

import torch

from scripts.benchmarks.common import add_random_bag_args, random_bags, report, timed
from scripts.mil.losses import MILLoss
from scripts.mil.registry import build_model


def _is_denormal(t: torch.Tensor) -> torch.Tensor:
    """Denormal entries of a float32 tensor, read from the bits (exponent 0, mantissa not 0), so the answer does
    not depend on whether torch is flushing denormals (which makes arithmetic read them as zero)."""
    bits = t.detach().contiguous().view(torch.int32)
    return ((bits & 0x7F800000) == 0) & ((bits & 0x007FFFFF) != 0)


def with_denormals(net: torch.nn.Module, fraction: float, seed: int = 0) -> int:
    """Set ``fraction`` of the entries of every weight matrix of ``net`` (float32) to random denormals, written as
    bit patterns (no arithmetic, so flushing cannot zero them); returns how many."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() < 2:
                continue
            hit = torch.rand(p.shape, generator=g) < fraction
            mantissa = torch.randint(1, 1 << 23, p.shape, generator=g, dtype=torch.int32)
            sign = torch.where(torch.rand(p.shape, generator=g) < 0.5, torch.tensor(-(1 << 31), dtype=torch.int32),
                               torch.tensor(0, dtype=torch.int32))
            p.view(torch.int32)[hit] = (mantissa | sign)[hit]
            count += int(hit.sum())
    return count


def denormal_count(net: torch.nn.Module) -> int:
    return sum(int(_is_denormal(p).sum()) for p in net.parameters() if p.dtype == torch.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks denormal", description=__doc__)
    ap.add_argument("--model", default="monai_att_trans_20x")
    ap.add_argument("--fraction", type=float, default=0.02, help="share of each weight matrix set to denormals")
    add_random_bag_args(ap, features=128, steps=20, features_help="patch feature size (128: the tiny encoder of the co-location cohorts)")
    args = ap.parse_args(argv)
    k = 8
    x, mask, y = random_bags(args.batch, args.per_cluster, args.features, k)
    rows, rates = [], {}
    try:
        for state, flush in (("denormals", False), ("denormals", True), ("zeroed", False)):
            torch.set_flush_denormal(False)
            net = build_model(args.model, in_features=args.features, num_clusters=k)
            planted = with_denormals(net, args.fraction)
            if state == "zeroed":
                with torch.no_grad():
                    for p in net.parameters():
                        p[_is_denormal(p)] = 0.0
            torch.set_flush_denormal(flush)
            opt = torch.optim.Adam(net.parameters(), lr=0.0)  # lr 0: the weights (and their denormals) stay as planted
            loss_fn = MILLoss(net)

            def train_steps():
                for _ in range(args.steps):
                    opt.zero_grad()
                    loss_fn(net(x, mask), y).backward()
                    opt.step()

            def forwards():
                with torch.no_grad():
                    for _ in range(args.steps):
                        net.eval()(x, mask)
                net.train()

            train_steps()  # warm-up
            name = f"{state}, flush_denormal {'on' if flush else 'off'}"
            rates[name] = (args.steps * args.batch / timed(train_steps), args.steps * args.batch / timed(forwards))
            rows.append({"weights": name, "train_bags_per_s": rates[name][0], "infer_bags_per_s": rates[name][1],
                         "denormal_weights": planted if state == "denormals" else denormal_count(net)})
    finally:
        torch.set_flush_denormal(False)  # torch's default
    off, on = rates["denormals, flush_denormal off"], rates["denormals, flush_denormal on"]
    zero = rates["zeroed, flush_denormal off"]
    report("denormal", rows, {"train_flush_vs_off": on[0] / off[0], "infer_flush_vs_off": on[1] / off[1],
                              "train_flush_vs_zeroed": on[0] / zero[0]}, args.json)


if __name__ == "__main__":
    main()
