"""The rule that picks ``run training``'s default model (``mil_model`` in configs/train.yaml), declared in the model
card (docs/README.md) and applied to recorded protocol results (docs/data/colocation_protocol.json)::

    python -m scripts.evaluation.model_choice docs/data/colocation_protocol.json

The rule:

1. **Cells.** Each cell is one run of the full protocol (``run evaluate``) on one generated co-location cohort with
   one protocol seed (``--eval_seed``). The recorded grid: the three co-location cohorts of docs/evaluation.md at
   100 patients x protocol seeds 0-2 (nine cells). The demo is not a cell: on 20-40 patients the spread between
   protocol seeds is larger than the gaps between models (docs/evaluation.md).
2. **Candidates** are the models with a combined (out-of-fold) AUC in every cell; a model missing a cell is listed
   but cannot be chosen (it has not been measured on the same evidence). Its row shows its mean over the cells it
   has, the leader's paired lead on those cells, and whether its missing cells could still change the default: they
   cannot when, even with AUC 1 in every missing cell, its mean stays below the leader's (so it cannot lead) and it
   has more parameters than the default (so a tie with the leader would not pick it). This bounds, it does not
   measure: the row stays partial until its cells are recorded.
3. **Score**: the mean combined AUC over the cells. The *leader* has the highest score.
4. **Ties go to the simpler model.** A candidate whose mean paired difference to the leader (leader minus
   candidate, cell by cell) is within ``z`` = 2 standard errors (the per-cell differences' sd / sqrt(cells)) is
   tied with it; among the leader and the candidates tied with it the one with the fewest parameters (at the
   paper's feature size, D = 2048) is the default.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def choose_default(auc: Mapping[str, Mapping[str, float]], grid: Sequence[str], parameters: Mapping[str, int],
                   z: float = 2.0) -> tuple[str, list[dict]]:
    """The rule above on ``auc`` (model -> cell -> combined AUC) over ``grid`` (the cells); returns the chosen model
    and one row per model (candidates by score first, then the models missing cells)."""
    candidates = [m for m in auc if all(c in auc[m] for c in grid)]
    if not candidates:
        raise ValueError(f"no model has a result in every cell of {list(grid)}")
    score = {m: float(np.mean([auc[m][c] for c in grid])) for m in candidates}
    leader = max(candidates, key=lambda m: (score[m], -parameters[m]))
    rows, tied = [], []
    for m in sorted(candidates, key=lambda m: -score[m]):
        d = np.array([auc[leader][c] - auc[m][c] for c in grid])
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
        tie = m == leader or (se > 0 and d.mean() <= z * se)
        if tie:
            tied.append(m)
        rows.append({"model": m, "cells": len(grid), "mean_auc": score[m], "diff_to_leader": float(d.mean()),
                     "se": se, "tied_with_leader": bool(tie), "parameters": int(parameters[m])})
    chosen = min(tied, key=lambda m: (parameters[m], -score[m]))
    for r in rows:
        r["chosen"] = r["model"] == chosen
    partial = [partial_row(m, auc, grid, leader, score[leader], parameters, parameters[chosen]) for m in set(auc) - set(candidates)]
    return chosen, rows + sorted(partial, key=lambda r: (-r["cells"], -(r["mean_auc"] if r["cells"] else -1.0), r["model"]))


def partial_row(model: str, auc: Mapping[str, Mapping[str, float]], grid: Sequence[str], leader: str, leader_score: float,
                parameters: Mapping[str, int], chosen_parameters: int) -> dict:
    """The row of a model missing cells (rule, step 2): mean and the leader's paired lead on the cells it has,
    ``best_possible`` (its mean with AUC 1 in every missing cell) and ``can_change_default``."""
    have = [c for c in grid if c in auc[model]]
    d = np.array([auc[leader][c] - auc[model][c] for c in have])
    best = float((sum(auc[model][c] for c in have) + len(grid) - len(have)) / len(grid))
    return {"model": model, "cells": len(have), "mean_auc": float(np.mean([auc[model][c] for c in have])) if have else float("nan"),
            "diff_to_leader": float(d.mean()) if have else float("nan"),
            "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"), "tied_with_leader": False,
            "parameters": int(parameters[model]), "chosen": False, "best_possible": best,
            "can_change_default": bool(best >= leader_score or parameters[model] <= chosen_parameters)}


def model_parameters(names: Sequence[str], in_features: int = 2048) -> dict[str, int]:
    """Trainable parameters of each registry model at feature size ``in_features`` (3 scales, 8 clusters)."""
    from scripts.mil.registry import build_model

    return {n: sum(p.numel() for p in build_model(n, in_features=in_features).parameters()) for n in names}


def markdown(rows: Sequence[dict]) -> str:
    """The rule's table (a partial row: its numbers are on the cells it has, and the default column says whether
    its missing cells could change the default)."""
    out = ["| model | cells | mean combined AUC | leader - model (± se) | tied with the leader | parameters | default |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        part = "best_possible" in r
        diff = "-" if math.isnan(r["diff_to_leader"]) else f"{r['diff_to_leader']:+.3f}" + ("" if math.isnan(r["se"]) else f" ± {r['se']:.3f}")
        mean = "-" if math.isnan(r["mean_auc"]) else f"{r['mean_auc']:.3f}"
        if part:
            mean += f" ({'its cells; ' if r['cells'] else 'no cells; '}at most {r['best_possible']:.3f})"
            diff += " (its cells)" if diff != "-" else ""
            default = "partial: its missing cells could change it" if r["can_change_default"] else "partial: cannot change it"
        else:
            default = "**yes**" if r["chosen"] else ""
        out.append(f"| {r['model']} | {r['cells']} | {mean} | {diff} | {'-' if part else 'yes' if r['tied_with_leader'] else 'no'} | "
                   f"{r['parameters']:,} | {default} |")
    return "\n".join(out)


def apply_rule(path: Path, z: float = 2.0) -> tuple[str, list[dict]]:
    """:func:`choose_default` on a recorded results file (``grid``, ``auc``), with every registry model listed: one
    without a recorded cell is a partial row of 0 cells."""
    from scripts.mil.registry import MODELS

    data = json.loads(Path(path).read_text())
    auc = {**{m: {} for m in MODELS}, **data["auc"]}
    return choose_default(auc, data["grid"], model_parameters(list(auc)), z)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.evaluation.model_choice", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="JSON with 'grid' (cells) and 'auc' (model -> cell -> combined AUC)")
    ap.add_argument("--z", type=float, default=2.0)
    args = ap.parse_args(argv)
    chosen, rows = apply_rule(Path(args.results), args.z)
    print(markdown(rows))
    open_rows = [r["model"] for r in rows if r.get("can_change_default")]
    print(f"\ndefault by the rule: {chosen}" + (f" (not settled: the missing cells of {', '.join(open_rows)} could change it)"
                                                 if open_rows else ""))


if __name__ == "__main__":
    main()
