"""The evaluation protocol (train.yaml + evaluate.yaml, in process) on a small generated co-location cohort (`strong2`, 40 patients; the label is a 20x texture
inside a 5x ring at one location): csmil_joint beats every single-scale baseline and is within 0.05 combined
AUC of the concatenation baseline (dsmil), and its per-scale maps find the lesions.

The protocol seed is the default (0), not one picked for the outcome. Over protocol seeds 0-4 on this cohort
(docs/evaluation.md, "The slow test on this cohort") csmil_joint is within 0.05 of dsmil on all five
and above every single-scale model on four; on seed 3 both multi-scale models fall below the 20x model.
"""

from __future__ import annotations

import json

import pytest
from monai.bundle import ConfigWorkflow

from conftest import ROOT, one_thread
from scripts.benchmarks.fusion import COLOCATION_COHORTS, SINGLE_SCALE

pytestmark = pytest.mark.slow

MODELS = ("csmil_joint", "dsmil", *SINGLE_SCALE)


def test_joint_fusion_matches_concatenation_and_beats_single_scales_on_a_colocation_cohort(tmp_path):
    out = tmp_path / "out"
    cohort = {k: list(v) if isinstance(v, tuple) else v for k, v in COLOCATION_COHORTS["strong2"].items()}
    size = cohort.pop("size")
    w = ConfigWorkflow(config_file=[str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "evaluate.yaml")], workflow_type="train",
                       bundle_root=str(ROOT), dataset_dir=str(tmp_path / "strong2"), output_dir=str(out), progress=False,
                       eval_num_splits=5, eval_bootstrap_resamples=200, eval_workers=1, eval_reference="csmil_joint",
                       demo_num_patients=40, demo_slide_size=size, demo_options=cohort, eval_models=list(MODELS))
    with one_thread():  # the runs of eval_workers = 2 (one thread each), in this process: no spawned interpreters
        w.initialize()
        w.run()
    rep = json.loads((out / "report" / "report.json").read_text())
    assert set(rep["models"]) == set(MODELS)
    auc = {n: rep["models"][n]["combined"]["auc"] for n in MODELS}
    for name in SINGLE_SCALE:
        assert auc["csmil_joint"] > auc[name], (name, auc)
    assert auc["csmil_joint"] >= auc["dsmil"] - 0.05, auc
    loc = rep["models"]["csmil_joint"]["localisation"]  # per-scale map AUROC against the lesion masks
    assert set(loc) == {"20x", "10x", "5x"} and min(loc.values()) > 0.6, loc
