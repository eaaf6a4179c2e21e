"""Fingerprints of the tiny demo's feature store and trained model (the ``trained`` fixture's command), so a
refactoring that changes either is caught (tests/test_config_layer.py).

The fingerprints are numbers, compared with a tolerance (:func:`differences`), not hashes of bytes: float32 kernels
round differently on another CPU (AVX2 / AVX-512 / AMX code paths of oneDNN and ATen) or with another library build,
and two trainings of the tiny model under different ISAs differ by up to 1e-6 in a weight. A changed computation (a
layer, a default, a bag, an epoch) moves them by orders of magnitude more. Coordinates are integers: exact.

Regenerate (only when a change of the numbers is intended, and say so in CHANGELOG.md)::

    python tests/golden_outputs.py <root of a `trained` run: holds out/cache/features and models/model.pt>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_tiny_demo.json"
#: relative / absolute tolerance of a fingerprint (the tiny model trained under AVX2 and AVX-512 kernels uses 5 % of it)
RTOL, ATOL = 1e-5, 1e-6


def summary(values: np.ndarray) -> list[float]:
    """Sum, sum of squares and two seeded random projections (float64) of an array: a changed value anywhere moves
    at least one of them."""
    v = np.asarray(values, dtype=np.float64).ravel()
    rng = np.random.default_rng(v.size)
    return [float(v.sum()), float((v * v).sum()), *(float(rng.standard_normal(v.size) @ v) for _ in range(2))]


def fingerprints(root: Path) -> dict:
    """Per slide: :func:`summary` of ``features.npy``, ``coords.npy`` as a list; per tensor of ``model.pt``: its
    :func:`summary` and shape."""
    features = {}
    for d in sorted((root / "out" / "cache" / "features").iterdir()):
        if d.is_dir() and (d / "features.npy").is_file():
            slide = json.loads((d / "meta.json").read_text())["slide_id"]
            f = np.load(d / "features.npy")
            features[slide] = {"features": summary(f), "shape": list(f.shape), "coords": np.load(d / "coords.npy").tolist()}
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    model = {k: {"summary": summary(v.detach().cpu().double().numpy()), "shape": list(v.shape)} for k, v in sorted(state.items())}
    return {"features": features, "model": model}


def differences(now: dict, golden: dict) -> list[str]:
    """What differs between two :func:`fingerprints` beyond :data:`RTOL` / :data:`ATOL` (exact for shapes and
    coordinates), one line each; empty when they agree."""
    out = []
    for part in ("features", "model"):
        if set(now[part]) != set(golden[part]):
            out.append(f"{part}: entries {sorted(set(now[part]) ^ set(golden[part]))} differ")
            continue
        for name, g in golden[part].items():
            n = now[part][name]
            for key, gv in g.items():
                same = (np.allclose(n[key], gv, rtol=RTOL, atol=ATOL) if key in ("features", "summary") else n[key] == gv)
                if not same:
                    out.append(f"{part} {name} {key}: {str(n[key])[:120]} != {str(gv)[:120]}")
    return out


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(fingerprints(Path(sys.argv[1])), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
