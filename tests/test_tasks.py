"""Tasks beyond binary (issue 28): K-class and survival models, losses, metrics, the protocol and inference columns."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from feature_cohort import write_entry
from scripts.data.bags import BagDataset, balanced_index
from scripts.errors import BundleInputError
from scripts.mil.pooling import CriticalInstancePooling
from scripts.mil.registry import MODELS, build_model
from scripts.tasks import labels, survival

ROOT = Path(__file__).resolve().parents[1]


def test_class_names_and_outputs():
    assert labels.class_names({"0": 0, "1": 1}) == ["0", "1"]
    assert labels.class_names({"normal": 0, "healthy": 0, "crohn": 1, "uc": 2}) == ["normal", "crohn", "uc"]
    assert labels.num_outputs("classification", {"a": 0, "b": 1, "c": 2}) == 3
    assert labels.num_outputs("survival", {"0": 0, "1": 1}, survival_bins=5) == 5
    with pytest.raises(BundleInputError, match="numbered 0..K-1"):
        labels.class_names({"a": 1, "b": 2})
    with pytest.raises(BundleInputError, match="is not one of"):
        labels.num_outputs("regression", {"0": 0, "1": 1})


def test_discrete_time_likelihood_by_hand():
    cuts = [10.0, 20.0]  # bins: [0, 10), [10, 20), [20, inf)
    loss = survival.DiscreteTimeNLL(cuts)
    logits = torch.tensor([[0.5, 0.1, -0.3], [0.2, 0.0, 1.0], [1.0, 1.0, 1.0]])
    target = torch.tensor([[5.0, 1.0], [15.0, 0.0], [25.0, 0.0]])  # event in bin 0; censored in bin 1; censored in bin 2
    p = torch.softmax(logits, -1)
    expected = -(torch.log(p[0, 0]) + torch.log(p[1, 1:].sum()) + torch.log(p[2, 2:].sum())) / 3
    assert torch.allclose(loss(logits, target), expected)
    # the bag ensemble hands log-probabilities: the same loss
    assert torch.allclose(loss(torch.log_softmax(logits, -1), target), expected)
    assert survival.time_bins(torch.tensor([0.0, 9.9, 10.0, 19.9, 20.0, 99.0]), torch.tensor(cuts)).tolist() == [0, 0, 1, 1, 2, 2]


def test_time_cuts_risk_and_concordance():
    cuts = survival.time_cuts([1, 2, 3, 4, 100, 5], [1, 1, 1, 1, 0, 1], num_bins=2)
    assert cuts == [3.0]  # median of the observed event times; the censored 100 is left out
    with pytest.raises(BundleInputError, match="no slide of the training data has an event"):
        survival.time_cuts([1, 2], [0, 0])
    r = survival.risk(np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0.25, 0.25, 0.25, 0.25]]))
    assert np.allclose(r, [1.0, 0.0, 0.5])
    t, e = [1, 2, 3, 4], [1, 1, 1, 0]
    assert survival.concordance(t, e, [4, 3, 2, 1]) == 1.0
    assert survival.concordance(t, e, [1, 2, 3, 4]) == 0.0


def test_two_class_pooling_unchanged_and_k_class_streams():
    torch.manual_seed(0)
    h, mask = torch.randn(3, 10, 16), torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    p2 = CriticalInstancePooling(16, 2)
    with torch.no_grad():
        _, w, _ = p2(h, mask)
    assert torch.allclose(p2.class_weights(h, mask)[..., 1], w, atol=1e-6)  # the binary map is class 1's
    p3 = CriticalInstancePooling(16, 3)
    with torch.no_grad():
        logits, w3, a3 = p3(h, mask)
    assert logits.shape == (3, 3) and w3.shape == a3.shape == (3, 10)
    assert torch.allclose(w3.sum(1), torch.ones(3)) and float(w3[0, 6:].abs().sum()) == 0.0
    cw = p3.class_weights(h, mask)
    pred = logits.argmax(-1)
    assert torch.allclose(cw[torch.arange(3), :, pred], w3, atol=1e-6)  # forward's weights: the predicted class's


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_has_k_outputs(name):
    x, mask = torch.randn(2, 3, 16, 8), torch.ones(2, 16, dtype=torch.bool)
    net = build_model(name, 8, num_classes=3).eval()
    logits, att = net.forward_attention(x, mask)
    assert logits.shape == (2, 3) and att["patch"].shape == (2, 16) and att["scale"].shape == (2, 16, 3)
    if "patch_class" in att:
        assert att["patch_class"].shape == (2, 16, 3)


def test_dsmil_k_class_maps_script():
    net = build_model("dsmil", 8, num_classes=3).eval()
    ts = torch.jit.script(net)
    x, mask = torch.randn(2, 3, 16, 8), torch.ones(2, 16, dtype=torch.bool)
    logits, att = ts.forward_attention(x, mask)
    pred = logits.argmax(-1)
    assert att["scale_class"].shape == (2, 16, 3, 3)
    assert torch.allclose(att["scale_class"][torch.arange(2), :, :, pred], att["scale"], atol=1e-6)
    assert torch.allclose(att["patch_class"][torch.arange(2), :, pred], att["patch"], atol=1e-6)


def _entries(tmp: Path, labels_: list[int], survival_times: list[tuple[float, int]] | None = None, dim: int = 8):
    rng = np.random.default_rng(0)
    out = []
    for i, lab in enumerate(labels_):
        e = write_entry(tmp, f"s{i}", f"p{i}", lab, rng.normal(size=(24, 3, dim)) + lab, rng.integers(0, 8, 24))
        if survival_times:
            e = replace(e, record=replace(e.record, time=survival_times[i][0], event=survival_times[i][1]))
        out.append(e)
    return out


def test_balanced_bags_give_every_class_the_same_draws(tmp_path):
    idx = balanced_index([torch.tensor(y) for y in [0, 0, 0, 0, 0, 0, 1, 1, 2]], bags_per_slide=2)
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])[idx]
    assert np.bincount(y).tolist() == [12, 12, 12]
    ds = BagDataset(_entries(tmp_path, [0, 0, 0, 1, 2]), num_clusters=2, per_cluster=2, bags_per_slide=2, balance_classes=True)
    assert len(ds) == 18 and sorted(int(ds[i]["label"]) for i in range(len(ds))) == [0] * 6 + [1] * 6 + [2] * 6


def test_survival_bags_carry_time_and_event(tmp_path):
    ds = BagDataset(_entries(tmp_path, [1, 0], [(12.5, 1), (30.0, 0)]), num_clusters=2, per_cluster=2, task="survival")
    assert ds[0]["label"].tolist() == [12.5, 1.0] and ds[4]["label"].tolist() == [30.0, 0.0]


def test_multiclass_metrics_match_sklearn():
    from scripts.evaluation.multiclass import kappa, macro_auc, multiclass_metrics

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 10)
    p = rng.dirichlet([1, 1, 1], size=30)
    p[np.arange(30), y] += 0.3
    p /= p.sum(1, keepdims=True)
    assert macro_auc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    m = multiclass_metrics(y, p, ["a", "b", "c"], ordinal=True)
    assert sum(map(sum, m["confusion"])) == 30 and set(m["per_class_auc"]) == {"a", "b", "c"}
    assert m["quadratic_kappa"] == pytest.approx(kappa(y, p)) and -1 <= m["quadratic_kappa"] <= 1


def test_survival_report_of_a_perfect_and_a_reversed_model():
    from scripts.evaluation.survival_report import build_survival_report, render_survival

    rng = np.random.default_rng(0)
    n = 40
    t = rng.exponential(10, n) + 0.1
    e = (rng.random(n) < 0.8).astype(int)
    ids = [f"s{i}" for i in range(n)]
    slides = {i: {"patient_id": i, "label": int(ev), "time": float(tt), "event": int(ev)} for i, tt, ev in zip(ids, t, e)}
    half = [ids[: n // 2], ids[n // 2:]]
    runs = {"good": [{"test": {i: float(-t[int(i[1:])]) for i in part}} for part in half],
            "reversed": [{"test": {i: float(t[int(i[1:])]) for i in part}} for part in half]}
    rep = build_survival_report({"mode": "cross_validation", "splits": [{}, {}], "runs": runs, "slides": slides}, "good", n_resamples=100)
    good, bad = rep["models"]["good"], rep["models"]["reversed"]
    assert good["combined"]["c_index"] == 1.0 and bad["combined"]["c_index"] == 0.0
    assert good["combined"]["risk_groups"]["logrank_p"] < 0.05
    assert good["combined"]["risk_groups"]["curves"]["high"]["median"] < good["combined"]["risk_groups"]["curves"]["low"]["median"]
    assert rep["comparisons"]["reversed"]["bootstrap"]["diff"] == 1.0
    assert "| good | 1.000" in render_survival(rep)


def test_stratified_concordance_is_lifelines_within_a_group_and_skips_pairs_across_groups():
    """One stratum: Harrell's C as lifelines counts it (tied times and tied risks included). Splits: a model that
    ranks each split's patients perfectly, on a risk scale shifted per split, scores 1.0 over the pairs within splits
    while the pairs across splits pull the naive pooled c-index down."""
    from scripts.tasks.survival import concordance, concordance_counts, stratified_concordance

    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(5, 40))
        t, e, r = rng.integers(1, 10, n).astype(float), rng.integers(0, 2, n), rng.integers(0, 4, n).astype(float)
        e[0] = 1
        assert stratified_concordance(t, e, r) == pytest.approx(concordance(t, e, r), abs=1e-12)
    good, pairs = concordance_counts([1.0, 2.0, 2.0, 3.0], [1, 1, 0, 0], [3.0, 1.0, 1.0, 0.0])
    # the event at 1 against the three later slides (all concordant); the event at 2 against the slide censored at 2
    # (tied risk: 0.5) and the one at 3 (concordant)
    assert pairs == 5 and good == 4.5
    t = np.arange(1.0, 21.0)
    e = np.ones(20, int)
    split = np.repeat([0, 1], 10)[rng.permutation(20)]
    r = -t + 100 * split  # perfect within a split; split 1's scale far above split 0's
    assert stratified_concordance(t, e, r, split) == 1.0
    assert concordance(t, e, r) < 0.8 and stratified_concordance(t, e, r) == pytest.approx(concordance(t, e, r))
    assert np.isnan(stratified_concordance([1.0, 2.0], [0, 0], [1.0, 0.0]))


def test_survival_report_compares_slides_of_one_split():
    """Cross-validation: each split's model has its own risk scale, so the combined c-index and the risk halves are
    taken within splits (the naive pooled c-index is kept beside it); an external test set is one stratum."""
    from scripts.evaluation.survival_report import build_survival_report, render_survival

    t = np.arange(1.0, 41.0)
    ids = [f"s{i}" for i in range(40)]
    slides = {i: {"patient_id": i, "label": 1, "time": float(tt), "event": 1} for i, tt in zip(ids, t)}
    parts = [ids[0::2], ids[1::2]]
    runs = {"shifted": [{"test": {i: float(-t[int(i[1:])] + 100 * k) for i in part}} for k, part in enumerate(parts)]}
    rep = build_survival_report({"mode": "cross_validation", "splits": [{}, {}], "runs": runs, "slides": slides}, "shifted", n_resamples=50)
    c = rep["models"]["shifted"]["combined"]
    assert c["c_index"] == 1.0 and c["strata"] == "split" and c["c_index_pooled"] < 0.8
    assert rep["models"]["shifted"]["ci95"]["c_index"]["low"] == 1.0
    g = c["risk_groups"]["curves"]
    assert g["high"]["n"] == g["low"]["n"] == 20 and g["high"]["median"] < g["low"]["median"]  # each split's own median
    assert "pairs of slides one split scored" in render_survival(rep)
    ext = {"shifted": [{"test": {i: float(-t[int(i[1:])]) for i in ids}}, {"test": {i: float(-t[int(i[1:])] + 1) for i in ids}}]}
    rep = build_survival_report({"mode": "external_test", "splits": [{}, {}], "runs": ext, "slides": slides}, "shifted", n_resamples=50)
    assert rep["models"]["shifted"]["combined"]["strata"] is None and rep["models"]["shifted"]["combined"]["c_index"] == 1.0


def test_protocol_for_three_classes_and_for_survival(tmp_path):
    """The protocol trains every model with configs/train.yaml for the task and writes its report."""
    from scripts.evaluation import workflow
    from scripts.workflows.pipeline_config import training_config

    y = [i % 3 for i in range(12)]
    files = workflow.evaluate(training_config({"max_epochs": 2, "label_map": {"a": 0, "b": 1, "c": 2}, "val_fraction": 0.5}),
                              _entries(tmp_path / "mc", y, dim=128), tmp_path / "mc-out", models=["dsmil", "deepattnmisl_20x"], reference="dsmil",
                              num_splits=2, val_fraction=0.5, test_bags=4, bootstrap_resamples=50, progress=False, class_names=["a", "b", "c"],
                              ordinal=True)
    rep = json.loads(files["json"].read_text())
    m = rep["models"]["dsmil"]
    assert rep["protocol"]["classes"] == ["a", "b", "c"] and len(m["predictions"]) == 12
    assert all(len(v) == 3 and abs(sum(v) - 1) < 1e-4 for v in m["predictions"].values())
    assert 0 <= m["combined"]["macro_auc"] <= 1 and "quadratic_kappa" in m["combined"] and "deepattnmisl_20x" in rep["comparisons"]
    assert "macro AUC" in files["md"].read_text() and "chosen by the lowest validation loss" in files["md"].read_text()

    times = [(float(5 + 3 * i), int(i % 3 != 2)) for i in range(18)]
    files = workflow.evaluate(training_config({"max_epochs": 2, "task": "survival", "survival_bins": 3, "val_fraction": 0.5}),
                              _entries(tmp_path / "sv", [ev for _, ev in times], times, dim=128), tmp_path / "sv-out", models=["dsmil"],
                              reference="dsmil", num_splits=2, val_fraction=0.5, test_bags=4, bootstrap_resamples=50, progress=False,
                              task="survival")
    rep = json.loads(files["json"].read_text())
    c = rep["models"]["dsmil"]["combined"]
    assert rep["protocol"]["task"] == "survival" and 0 <= c["c_index"] <= 1 and c["events"] == 12
    assert all(0 <= r <= 1 for r in rep["models"]["dsmil"]["predictions"].values())
    md = files["md"].read_text()
    assert (files["json"].parent / "km.png").is_file() and "c-index" in md
    assert rep["protocol"]["selection_metric"] == "val_cindex" and "chosen by the highest validation concordance index" in md
    run = next((tmp_path / "sv-out" / "evaluation" / "runs" / "dsmil").glob("split_0-*"))
    from scripts.checkpoint.contract import read_file

    contract = read_file(run / "model.pt")
    assert contract["task"] == "survival" and len(contract["survival_cuts"]) == 2
    # survival selects the epoch of the highest validation c-index, classification that of the lowest validation loss
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["selection_metric"] == "val_cindex"
    assert summary["best"]["val_cindex"] == max(h["val_cindex"] for h in summary["history"] if h.get("val_cindex") is not None)
    mc = json.loads(next((tmp_path / "mc-out" / "evaluation" / "runs" / "dsmil").glob("split_0-*/training_summary.json")).read_text())
    assert mc["selection_metric"] == "val_loss" and mc["best"]["val_loss"] == min(h["val_loss"] for h in mc["history"])


def test_selection_metric_of_the_evaluator():
    from scripts.workflows.engine import better, selection_metrics

    metrics = {"val_loss": 1, "val_cindex": 2}
    assert selection_metrics(metrics, "val_cindex", "survival") == ({"val_cindex": 2}, {"val_loss": 1})
    assert better("val_loss")(0.5, 0.6) and not better("val_loss")(0.7, 0.6)
    assert better("val_cindex")(0.7, 0.6) and not better("val_cindex")(0.5, 0.6)
    with pytest.raises(BundleInputError, match="'val_auc' is not a validation metric of task 'survival'") as err:
        selection_metrics(metrics, "val_auc", "survival")
    assert "val_cindex" in err.value.fix


def test_prediction_columns_per_task(tmp_path):
    from scripts.inference.outputs import prediction_columns
    from scripts.inference.predict import SlidePrediction

    e = _entries(tmp_path, [2], [(7.0, 1)])[0]
    pred = SlidePrediction("s0", 0.5, np.zeros((1, 3)), np.zeros((1, 3)), 0.1, np.array([0.2, 0.3, 0.5]), 2)
    assert prediction_columns(e, pred, task="classification", class_names=["n", "cd", "uc"]) == {
        "prob_n": 0.2, "prob_cd": 0.3, "prob_uc": 0.5, "predicted_class": "uc", "label": 2, "true_label": 2}
    assert prediction_columns(e, replace(pred, probability=0.8), task="survival") == {"risk": 0.8, "true_time": 7.0, "true_event": 1}
    two = replace(pred, probability=0.7, probabilities=np.array([0.3, 0.7]), map_class=None)
    assert prediction_columns(e, two, threshold=0.5) == {"probability": 0.7, "label": 1, "true_label": 2}


@pytest.mark.slow
def test_three_class_training_inference_and_a_task_mismatch(tmp_path):
    """`run training` with a three-class label_map on the generated cohort, `run inference` writes prob_<name> and the maps of
    the predicted class, and inference refuses to run the checkpoint as a survival model."""
    common = ["--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "models"),
              "--progress", "false"]
    train = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml", *common,
             "--label_map", "{'normal': 0, 'circle': 1, 'square': 2}",
             "--demo_if_missing", "false", "--max_epochs", "2", "--val_fraction", "0.5"]
    # the generated manifest writes class indices; the label_map names them
    from scripts.data.demo import DemoParams, generate_demo

    generate_demo(tmp_path / "data", DemoParams(num_patients=6, size=1024, num_classes=3), progress=False)
    manifest = tmp_path / "data" / "manifest.csv"
    names = {"0": "normal", "1": "circle", "2": "square"}
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([rows[0]] + [",".join(r.split(",")[:3] + [names[r.split(",")[3]]] + r.split(",")[4:]) for r in rows[1:]]) + "\n")
    r = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = manifest.read_text().splitlines()
    three = tmp_path / "data" / "three.csv"  # one slide of each class (inference writes maps and heatmaps per slide)
    three.write_text("\n".join(lines[:4]) + "\n")
    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml", "--input", str(three),
             "--output_dir", str(tmp_path / "inf"), "--cache_dir", str(tmp_path / "out" / "cache"), "--ckpt_dir", str(tmp_path / "models"),
             "--progress", "false"]
    r = subprocess.run(infer, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import csv

    rows = list(csv.DictReader((tmp_path / "inf" / "predictions.csv").open()))
    assert len(rows) == 3 and {"prob_normal", "prob_circle", "prob_square", "predicted_class"} <= set(rows[0])
    for row in rows:
        probs = {n: float(row[f"prob_{n}"]) for n in ("normal", "circle", "square")}
        assert abs(sum(probs.values()) - 1) < 1e-4 and row["predicted_class"] == max(probs, key=probs.get)
        pj = json.loads((tmp_path / "inf" / row["slide_id"] / "prediction.json").read_text())
        assert pj["map_class_name"] == row["predicted_class"] and (tmp_path / "inf" / row["slide_id"] / "attention_20x.tif").is_file()
    from scripts.checkpoint.trained import TrainedModel

    model = TrainedModel(tmp_path / "models" / "model.pt")  # what inference.yaml's `trained` reads
    assert model.class_names == ["normal", "circle", "square"] and model.num_outputs == 3
    with pytest.raises(BundleInputError, match="trained with task = classification but this run has task = survival"):
        TrainedModel(tmp_path / "models" / "model.pt", {"task": "survival"})  # --task survival on the command line


@pytest.mark.parametrize("lesions", [0, 2])
def test_three_class_cohort_balances_every_cue(lesions):
    """Only co-location tells the classes apart: every class shows as many textures, tints and rings of each kind."""
    from scripts.data.demo import DemoParams, _structure_kinds

    params = DemoParams(num_classes=3, lesions_per_positive=lesions)
    counts = []
    for label in range(3):
        kinds = _structure_kinds(label, params, np.random.default_rng(label))
        counts.append([sum(cue in k for k in kinds) for cue in ("T", "S", "R", "Q")])
        assert len(kinds) == 4
    assert counts[0] == counts[1] == counts[2]
    with pytest.raises(ValueError, match="second_ring"):
        DemoParams(num_classes=3, second_ring="triangle")


def test_survival_cohort_times_shorten_with_the_lesion_burden():
    from scripts.data.demo import survival_outcome

    med = [np.median([survival_outcome(b, np.random.default_rng([0, p]))[0] for p in range(200)]) for b in range(3)]
    assert med[0] > med[1] > med[2]


def test_survival_csmil_joint_gets_dropout_and_every_other_model_keeps_its_default():
    """``mil_dropout`` (train.yaml): 0.25 in csmil_joint for survival; null otherwise, where build_model keeps each model's
    published default (the binary models and their golden outputs are unchanged)."""
    from scripts.workflows.pipeline_config import pipeline_parser

    def drops(net):
        return sorted({m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)})

    for name, survival_drops in (("csmil_joint", [0.25]), ("dsmil", [0.0]), ("deepattnmisl_20x", [0.5])):
        survival = pipeline_parser({"task": "survival", "mil_model": name}).get_parsed_content("network_def")
        assert drops(survival) == survival_drops, name
        classification = pipeline_parser({"mil_model": name}).get_parsed_content("network_def")
        assert repr(classification) == repr(build_model(name, in_features=classification.in_features, num_classes=2))
    assert drops(build_model("csmil_joint", 128, dropout=None)) == [0.0] and drops(build_model("csmil_joint", 128, dropout=0.3)) == [0.3]
