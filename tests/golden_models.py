"""Outputs of every model of the registry for fixed weights and bags, so that a refactoring of ``scripts/mil``
(issue 30: one base for every model) keeps every model's numbers and state-dict keys (tests/test_mil.py).

Regenerate (only when a change of the numbers is intended, and say so in CHANGELOG.md)::

    python tests/golden_models.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.mil.registry import MODELS, build_model  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_mil_models.json"


def model_outputs(name: str) -> dict:
    """State-dict keys, logits with and without a mask and (where the model has it) ``forward_attention``'s maps of
    ``name`` built under seed 0 (D=16, S=3, K=4) on two seeded bags of 8 slots, the second with two empty slots."""
    torch.manual_seed(0)
    net = build_model(name, in_features=16, num_scales=3, num_clusters=4)
    g = torch.Generator().manual_seed(1)
    net.set_input_stats(torch.randn(16, generator=g), torch.rand(16, generator=g) + 0.5)
    net.eval()
    x = torch.randn(2, 3, 8, 16, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, [1, 6]] = False
    with torch.no_grad():
        out = {"keys": sorted(net.state_dict()), "logits": net(x, mask).tolist(), "logits_nomask": net(x).tolist()}
        if hasattr(net, "forward_attention"):
            out["attention"] = {k: v.tolist() for k, v in sorted(net.forward_attention(x, mask)[1].items())}
    return out


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps({n: model_outputs(n) for n in sorted(MODELS)}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
