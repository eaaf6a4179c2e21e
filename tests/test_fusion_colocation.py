"""`run evaluate` on a small generated co-location cohort (`strong2`, 40 patients; the label is a 20x texture
inside a 5x ring at one location): csmil_joint beats every single-scale baseline and is within 0.05 combined
AUC of the concatenation baseline (dsmil), and its per-scale maps find the lesions.

The protocol seed is the default (0), not one picked for the outcome. Over protocol seeds 0-4 on this cohort
(docs/evaluation.md, "The slow test on this cohort") csmil_joint is within 0.05 of dsmil on all five
and above every single-scale model on four; on seed 3 both multi-scale models fall below the 20x model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from scripts.benchmarks.fusion import SINGLE_SCALE, cohort_overrides

pytestmark = pytest.mark.slow

MODELS = ("csmil_joint", "dsmil", *SINGLE_SCALE)


def test_joint_fusion_matches_concatenation_and_beats_single_scales_on_a_colocation_cohort(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluate", "--config_file", "configs/evaluate.yaml",
           "--dataset_dir", str(tmp_path / "strong2"), "--output_dir", str(out), "--progress", "False",
           "--eval_num_splits", "5", "--eval_bootstrap_resamples", "200", "--eval_workers", "2",
           "--eval_reference", "csmil_joint", *cohort_overrides("strong2", 40), "--eval_models", json.dumps(list(MODELS))]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report" / "report.json").read_text())
    assert set(rep["models"]) == set(MODELS)
    auc = {n: rep["models"][n]["combined"]["auc"] for n in MODELS}
    for name in SINGLE_SCALE:
        assert auc["csmil_joint"] > auc[name], (name, auc)
    assert auc["csmil_joint"] >= auc["dsmil"] - 0.05, auc
    loc = rep["models"]["csmil_joint"]["localisation"]  # per-scale map AUROC against the lesion masks
    assert set(loc) == {"20x", "10x", "5x"} and min(loc.values()) > 0.6, loc
