"""End-to-end runs of the bundle commands as a user types them (a subprocess where the command line is under test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_bundle, ROOT, TINY_DEMO, default_network

pytestmark = pytest.mark.slow


def bundle(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def tiny_overrides(dataset: Path, out: Path) -> list[str]:
    return [
        "--dataset_dir", str(dataset), "--output_dir", str(out), "--ckpt_dir", str(out / "models"),
        "--demo_num_patients", str(TINY_DEMO.num_patients), "--demo_slide_size", str(TINY_DEMO.size),
        "--progress", "False",
    ]


def test_training_chain_from_scratch(tmp_path):
    """generate -> prepare -> extract -> cluster -> train 1 epoch from one command on an empty folder."""
    data, out = tmp_path / "demo", tmp_path / "out"
    r = bundle("run", "training", "--config_file", "configs/train.yaml", *tiny_overrides(data, out),
               "--max_epochs", "1", "--val_fraction", "0.5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (data / "manifest.csv").is_file() and len(list((data / "slides").glob("*.tif"))) == 4
    assert len(list((out / "cache" / "tiles").glob("*/tissue.png"))) == 4
    assert len(list((out / "cache" / "features").glob("*/clusters.npy"))) == 4
    ckpt = out / "models" / "model.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["input_mean"].shape == (128,) and set(state) == set(default_network(128).state_dict())  # the default mil_model
    assert list((out / "logs").glob("events.out.tfevents.*"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["epochs"] == 1 and summary["best"]["epoch"] == 1
    assert "Validation AUC" in r.stdout + r.stderr

    # second run: every stage is cached (no demo generation, no extraction), the alias `run` works
    r2 = bundle("run", "--config_file", "configs/train.yaml", *tiny_overrides(data, out), "--max_epochs", "1",
                "--val_fraction", "0.5")
    assert r2.returncode == 0, r2.stderr[-3000:]
    log = r2.stdout + r2.stderr
    assert "generating the demo cohort" not in log and "extracting features" not in log


def test_missing_manifest_is_one_clear_line(tmp_path):
    r = bundle("run", "prepare", "--config_file", "configs/train.yaml", "--dataset_dir", str(tmp_path / "nowhere"),
               "--output_dir", str(tmp_path / "out"), "--demo_if_missing", "False")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "manifest.csv" in last and "Fix:" in last
    assert "Traceback" not in r.stderr


def test_extract_with_pretrained_encoders(tmp_path):
    """`--encoder_weights pretrain` runs SimSiam per scale first and extracts with those weights."""
    data, out = tmp_path / "demo", tmp_path / "out"
    run_bundle("train.yaml", "extract", dataset_dir=str(data), output_dir=str(out), ckpt_dir=str(out / "models"),  # in process
               demo_num_patients=TINY_DEMO.num_patients, demo_slide_size=TINY_DEMO.size, encoder_weights="pretrain", pretrain_epochs=1,
               pretrain_batch_size=8, pretrain_max_patches_per_slide=4, pretrain_scales_mpp=[1.0, 2.0], max_patches=16)
    weights = sorted((out / "pretrain").glob("*/encoder.pt"))
    assert len(weights) == 2
    from scripts.cache import tensor_dict_hash

    pretrained = {tensor_dict_hash(torch.load(w, weights_only=True)) for w in weights}
    metas = [json.loads(p.read_text()) for p in (out / "cache" / "features").glob("*/meta.json")]
    assert len(metas) == 4
    shas = [e["weights_sha"] for e in metas[0]["encoders"]]
    assert shas[0] not in pretrained and set(shas[1:]) == pretrained  # 20x random, 10x/5x pretrained
