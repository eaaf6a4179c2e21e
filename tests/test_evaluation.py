"""The evaluation protocol: splits, variants, runs trained with the training config, resume, report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import ROOT
from feature_cohort import cross_scale_cohort
from scripts.errors import BundleInputError
from scripts.evaluation import protocol, report, workflow
from scripts.workflows.pipeline_config import training_config
from scripts.workflows.splits import protocol_splits


def _cohort(n_patients=20, slides=2):
    ids, pats, labs = [], [], []
    for p in range(n_patients):
        for s in range(slides):
            ids.append(f"p{p}-s{s}")
            pats.append(f"p{p}")
            labs.append(p % 2)
    return ids, pats, labs


def test_cross_validation_splits_cover_every_slide_once_without_leakage():
    ids, pats, labs = _cohort()
    splits = protocol_splits(ids, pats, labs, num_splits=5, val_fraction=0.25, seed=0)
    assert len(splits) == 5
    tested = [i for s in splits for i in s["test"]]
    assert sorted(tested) == sorted(ids)  # each slide tested exactly once
    patient = dict(zip(ids, pats))
    label = dict(zip(ids, labs))
    for s in splits:
        parts = [{patient[i] for i in s[k]} for k in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(s["train"]) + len(s["val"]) + len(s["test"]) == len(ids)
        for k in ("val", "test"):
            assert {label[i] for i in s[k]} == {0, 1}  # stratified
    assert protocol_splits(ids, pats, labs, 5, 0.25, 0) == splits  # seeded
    assert protocol_splits(ids, pats, labs, 5, 0.25, 1) != splits


def test_external_test_set_is_shared_by_all_splits():
    ids, pats, labs = _cohort(24, 1)
    test = [i >= 20 for i in range(24)]
    splits = protocol_splits(ids, pats, labs, num_splits=4, seed=0, test=test)
    assert all(s["test"] == ids[20:] for s in splits)
    vals = [i for s in splits for i in s["val"]]
    assert sorted(vals) == sorted(ids[:20])  # leave-one-fold-out over the development cohort


def test_leakage_guard_fires_when_a_patient_is_in_test_and_development():
    ids, pats, labs = _cohort(12, 2)
    test = [i.endswith("s1") and i.startswith("p1") for i in ids]  # p1's second slide only
    with pytest.raises(BundleInputError, match="appears in both"):
        protocol_splits(ids, pats, labs, num_splits=3, seed=0, test=test)


def test_too_few_patients_for_the_splits_names_the_fix():
    ids, pats, labs = _cohort(6, 1)
    with pytest.raises(BundleInputError, match="eval_num_splits"):
        protocol_splits(ids, pats, labs, num_splits=10)


def test_variants_and_ablation_names():
    v = protocol.make_variants(["csmil", "deepattnmisl_20x"], "bag_per_cluster", [16, 1])
    assert [x.name for x in v] == ["csmil", "deepattnmisl_20x", "csmil[bag_per_cluster=16]", "csmil[bag_per_cluster=1]"]
    assert v[-1].overrides == {"bag_per_cluster": 1} and v[-1].model == "csmil"
    with pytest.raises(ValueError, match="unknown model"):
        protocol.make_variants(["csmil", "nope"])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A small protocol on a synthetic cross-scale feature cohort, each run trained with configs/train.yaml."""
    tmp = tmp_path_factory.mktemp("evaluation")
    entries = cross_scale_cohort(tmp / "store", num_patients=16)
    out = tmp / "out"
    files = workflow.evaluate(
        training_config({"max_epochs": 8, "val_interval": 1}), entries, out, models=["csmil", "deepattnmisl_5x"], num_splits=2,
        seed=0, test_bags=4, bootstrap_resamples=200, ablation_id="bag_per_cluster", ablation_values=[2], progress=False,
    )
    return entries, out, files


def test_protocol_writes_report_files_and_consistent_numbers(evaluated):
    entries, out, files = evaluated
    for name in ("report.json", "report.md", "roc.png", "pr.png", "calibration.png"):
        assert (out / "report" / name).stat().st_size > 0
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["protocol"]["models"] == ["csmil", "deepattnmisl_5x", "csmil[bag_per_cluster=2]"]
    assert set(rep["models"]) == set(rep["protocol"]["models"])
    ref = rep["models"]["csmil"]
    assert len(ref["per_split"]) == 2 and set(ref["predictions"]) == {e.slide_id for e in entries}
    assert all(0.0 <= p <= 1.0 for p in ref["predictions"].values())
    assert ref["ci95"]["auc"]["low"] <= ref["ci95"]["auc"]["estimate"] <= ref["ci95"]["auc"]["high"]
    assert ref["mean"]["auc"] == pytest.approx(np.nanmean([s["auc"] for s in ref["per_split"]]))
    assert set(rep["comparisons"]) == {"deepattnmisl_5x", "csmil[bag_per_cluster=2]"}
    assert 0 < rep["comparisons"]["deepattnmisl_5x"]["delong"]["p"] <= 1
    md = (out / "report" / "report.md").read_text()
    assert "## Table 1" in md and "## Table 2" in md and "## Table 4: ablation" in md and "![roc.png](roc.png)" in md
    # the report names how checkpoints were chosen and the software whose versions decide its numbers
    import torch

    assert rep["protocol"]["selection_metric"] == "val_loss" and "chosen by the lowest validation loss" in md
    assert rep["protocol"]["environment"]["torch"] == torch.__version__ and f"torch {torch.__version__}" in md
    assert {"numpy", "scikit-learn", "imagecodecs", "libopenslide", "cpu_capability"} <= set(rep["protocol"]["environment"])
    # every run kept its checkpoint, training summary and predictions; nothing partial left behind
    runs = sorted((out / "evaluation" / "runs").glob("*/*"))
    assert len(runs) == 6 and not [r for r in runs if r.name.endswith(".partial")]
    assert all((r / "model.pt").is_file() and (r / "predictions.json").is_file() for r in runs)


def test_protocol_resumes_without_retraining(evaluated, monkeypatch):
    entries, out, _ = evaluated
    stale = out / "evaluation" / "runs" / "csmil" / "split_0-0000000000.partial"
    stale.mkdir()
    calls = []
    monkeypatch.setattr(protocol.ConfigParser, "get_parsed_content", lambda *a, **k: calls.append(a) or None)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        workflow.evaluate(training_config({"max_epochs": 8, "val_interval": 1}), entries, out, models=["csmil", "deepattnmisl_5x"], num_splits=2,
                          seed=0, test_bags=4, bootstrap_resamples=200, ablation_id="bag_per_cluster", ablation_values=[2], progress=False)
    finally:
        os.chdir(cwd)
    assert calls == []  # every (variant, split) was finished: nothing trained again


def test_markdown_tables_follow_the_paper_layout():
    rep = {"protocol": {"mode": "cross_validation", "num_splits": 2, "reference": "csmil", "bootstrap_resamples": 10,
                        "bootstrap_unit": "patient", "seed": 0, "test_bags": 5}, "models": {}, "comparisons": {}}
    m = {"mean": {k: 0.5 for k in report.SUMMARY_KEYS}, "sd": {k: 0.1 for k in report.SUMMARY_KEYS}, "ci95": {},
         "combined": {"brier": 0.2, "at_0.5": {"sensitivity": 1, "specificity": 0, "balanced_accuracy": 0.5},
                      "at_val": {"sensitivity": 1, "specificity": 0, "balanced_accuracy": 0.5}}, "calibration": {"ece": 0.1}}
    for n in ["csmil", "deepattnmisl_20x", "csmil_shared_tanh"]:
        rep["models"][n] = m
    md = report.render_markdown(rep)
    t1 = md.split("## Table 1")[1].split("##")[0]
    assert "deepattnmisl_20x" in t1 and "| csmil |" in t1 and "csmil_shared_tanh" not in t1
    assert "## Table 3" in md and "| csmil_shared_tanh |" in md.split("## Table 3")[1]
    assert "## Table 4" not in md
    assert "hyper-parameters, its checkpoint" in md  # the shared recipe: nothing to say
    rep["protocol"]["train_recipe"] = "published"
    assert "hyper-parameters (train_recipe published: each head from the field with the optimiser its authors published)" in report.render_markdown(rep)


def test_external_test_set_is_scored_by_the_ensemble_of_split_models(tmp_path, monkeypatch):
    entries = cross_scale_cohort(tmp_path / "store", num_patients=12)
    dev, test = entries[:8], entries[8:]
    files = workflow.evaluate(training_config({"max_epochs": 2}), dev, tmp_path / "out", models=["csmil", "deepattnmisl_20x"], test_entries=test,
                              num_splits=2, seed=0, test_bags=3, bootstrap_resamples=50, progress=False)
    rep = json.loads(files["json"].read_text())
    assert rep["protocol"]["mode"] == "external_test"
    assert all(s["test"] == [e.slide_id for e in test] for s in rep["splits"])
    runs = sorted((tmp_path / "out" / "evaluation" / "runs" / "csmil").iterdir())
    per_split = [json.loads((r / "predictions.json").read_text())["test"] for r in runs]
    ens = rep["models"]["csmil"]["predictions"]
    assert set(ens) == {e.slide_id for e in test}
    for sid, p in ens.items():  # combined = mean probability of the split models
        assert p == pytest.approx(np.mean([ps[sid] for ps in per_split]))
    assert "ensemble of the split models" in (tmp_path / "out" / "report" / "report.md").read_text()


def test_protocol_numbers_unchanged_by_the_config_layer(evaluated):
    """The protocol's predictions on the synthetic cohort equal those of 0.11.0 (before one parse per command and
    the unified bag ensemble; to float32 rounding): tests/data/golden_evaluation.json."""
    _, _, files = evaluated
    rep = json.loads(files["json"].read_text())
    golden = json.loads((ROOT / "tests" / "data" / "golden_evaluation.json").read_text())
    assert set(rep["models"]) == set(golden)
    for model, g in golden.items():
        # float32 kernels round differently on other CPUs / library builds (up to 6e-8 seen): not a change of the protocol
        assert rep["models"][model]["predictions"] == pytest.approx(g["predictions"], abs=1e-6), model
        assert rep["models"][model]["mean"]["auc"] == pytest.approx(g["mean_auc"], abs=1e-12), model


def test_a_relabelled_slide_is_never_served_from_the_run_cache(tmp_path):
    """The run cache's key holds the manifest's labels and patients: a corrected manifest trains again."""
    from scripts.data.manifest import SlideRecord
    from scripts.features.store import FeatureEntry

    e = cross_scale_cohort(tmp_path / "store", num_patients=2)[0]
    flipped = FeatureEntry(e.path, SlideRecord(e.slide_id, e.patient_id, e.record.path, 1 - e.label))
    moved = FeatureEntry(e.path, SlideRecord(e.slide_id, "other-patient", e.record.path, e.label))
    assert len({str(protocol._entry_key(x)) for x in (e, flipped, moved)}) == 3
