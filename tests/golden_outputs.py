"""Fingerprints of the tiny demo's feature store and trained model (the ``trained`` fixture's command), so a
refactoring that changes either is caught (tests/test_config_layer.py).

Regenerate (only when a change of the numbers is intended, and say so in CHANGELOG.md)::

    python tests/golden_outputs.py <root of a `trained` run: holds out/cache/features and models/model.pt>
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_tiny_demo.json"


def fingerprints(root: Path) -> dict:
    """sha256 of every slide's ``features.npy`` and ``coords.npy`` values and of every tensor of ``model.pt``."""
    features = {}
    for d in sorted((root / "out" / "cache" / "features").iterdir()):
        if d.is_dir() and (d / "features.npy").is_file():
            slide = json.loads((d / "meta.json").read_text())["slide_id"]
            features[slide] = {name: hashlib.sha256(np.ascontiguousarray(np.load(d / f"{name}.npy")).tobytes()).hexdigest()
                               for name in ("features", "coords")}
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    model = {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for k, v in sorted(state.items())}
    return {"features": features, "model": model}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(fingerprints(Path(sys.argv[1])), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
