"""The README's main command on the default demo cohort, then inference: the model localises lesions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_default_demo_training_and_localisation(tmp_path):
    data, out, models = tmp_path / "demo", tmp_path / "out", tmp_path / "models"
    common = ["--dataset_dir", str(data), "--output_dir", str(out), "--ckpt_dir", str(models), "--progress", "False"]
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml", *common],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    best = json.loads((out / "training_summary.json").read_text())["best"]
    assert best["val_auc"] > 0.5  # seeded: the demo's cross-scale signal is learnt
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
                        *common, "--num_bags", "20"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "localisation.json").read_text())
    assert set(summary) == {"20x", "10x", "5x"}
    for scale, s in summary.items():
        assert s["slides"] == 10 and 0.0 <= s["mean_auroc"] <= 1.0, (scale, s)
    # 15 training patients: the maps find the lesions at the best scale; every scale is checked on the 40-patient
    # protocol (tests/test_evaluation_demo.py), where the default model's maps reach > 0.6 at each scale
    assert max(s["mean_auroc"] for s in summary.values()) > 0.6, summary
