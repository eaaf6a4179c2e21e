"""Benchmark helpers that turn measurements into the numbers the docs quote (no timing here)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scripts.benchmarks.common import report
from scripts.benchmarks.fusion import summarise


def _report(aucs: dict[str, float], loc: dict[str, float] | None = None) -> dict:
    return {"models": {n: {"combined": {"auc": a, "ap": a, "accuracy": 0.5}, "mean": {"auc": a + 0.01},
                           **({"localisation": loc} if loc and n != "deepattnmisl_20x" else {})} for n, a in aucs.items()}}


def test_fusion_benchmark_averages_protocol_seeds_and_ranks_models(capsys):
    reports = {0: _report({"dsmil": 0.9, "csmil_joint": 0.7, "csmil": 0.6, "deepattnmisl_20x": 0.55}, {"20x": 0.8, "5x": 0.6}),
               1: _report({"dsmil": 0.7, "csmil_joint": 0.8, "csmil": 0.5, "deepattnmisl_20x": 0.45}, {"20x": 0.6, "5x": 0.4})}
    rows, ratios = summarise(reports)
    assert [r["model"] for r in rows] == ["dsmil", "csmil_joint", "csmil", "deepattnmisl_20x"]
    dsmil = rows[0]
    assert dsmil["auc_combined"] == pytest.approx(0.8) and dsmil["auc_combined_sd"] == pytest.approx(0.1)
    assert dsmil["per_seed"] == "0.900 0.700" and dsmil["auc_mean"] == pytest.approx(0.81)
    assert dsmil["loc_20x"] == pytest.approx(0.7) and dsmil["loc_5x"] == pytest.approx(0.5)
    assert "loc_20x" not in rows[-1]  # single-scale models give no maps here
    assert ratios["joint_vs_concat"] == pytest.approx(0.75 / 0.8)
    assert ratios["joint_vs_paper"] == pytest.approx(0.75 / 0.55)
    assert ratios["best_single_scale"] == pytest.approx(0.5)
    assert not any(math.isnan(v) for v in ratios.values())
    report("fusion", rows, ratios)  # rows with and without localisation print as one table
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["model", "auc_combined"] and "loc_5x" in lines[1]
    assert lines[-2].split()[0] == "deepattnmisl_20x" and lines[-2].rstrip().endswith("-")
    assert lines[-1].startswith("ratios: joint_vs_concat=0.938")


def test_protocol_benchmarks_pass_a_reference_among_the_models(tmp_path):
    """A benchmark of one new model needs no csmil_joint run: the reference is csmil_joint only when it is evaluated
    (run evaluate refuses a reference outside eval_models)."""
    from scripts.benchmarks.common import protocol_command
    from scripts.benchmarks.fusion import reference_model

    assert reference_model(["dsmil", "csmil_joint"]) == "csmil_joint"
    assert reference_model(["monai_att_concat"]) == "monai_att_concat"
    assert reference_model(["monai_att_concat", "dsmil"], "dsmil") == "dsmil"
    cmd = protocol_command(tmp_path, 2, 5, 1, 100, ["--eval_models", '["monai_att_concat"]'], tag="x-", reference="monai_att_concat")
    assert cmd[cmd.index("--eval_reference") + 1] == "monai_att_concat"
    assert cmd[cmd.index("--output_dir") + 1] == str(tmp_path / "out-x-seed2") and cmd[cmd.index("--eval_seed") + 1] == "2"
    assert cmd[-2:] == ["--eval_models", '["monai_att_concat"]']


def test_fusion_benchmark_names_published_recipe_rows_as_the_protocol_s_ablation_does():
    from scripts.benchmarks.fusion import recipe_row_name
    from scripts.evaluation.protocol import make_variants

    ablation = make_variants(["dsmil"], "train_recipe", ["published"], ["transmil_concat"])[-1].name
    assert recipe_row_name("transmil_concat", "published") == ablation == "transmil_concat[train_recipe=published]"
    assert recipe_row_name("dsmil", "published") == "dsmil"  # no recipe of its own: the shared run
    assert recipe_row_name("transmil_concat", "shared") == "transmil_concat"


def test_fusion_record_merges_cells_into_the_rule_file_the_rule_reads(tmp_path):
    """--record puts each model's combined AUC per seed into the rule's evidence file (new cells and grid entries,
    a re-measured cell replaced, other models kept); model_choice reads the result; a file of another form and the
    published recipe are refused."""
    from scripts.benchmarks.fusion import main, record_cells
    from scripts.evaluation.model_choice import choose_default

    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({"about": "x", "grid": ["clean-100/seed0"], "auc": {"dsmil": {"clean-100/seed0": 0.884}}}))
    reports = {s: {"models": {"monai_att_trans_concat": {"combined": {"auc": a}}, "dsmil": {"combined": {"auc": 0.9}}}}
               for s, a in ((0, 0.91234), (1, 0.5))}
    written = record_cells(rule, "clean", 100, reports)
    data = json.loads(rule.read_text())
    assert data["about"] == "x" and data["grid"] == ["clean-100/seed0", "clean-100/seed1"]
    assert data["auc"]["monai_att_trans_concat"] == {"clean-100/seed0": 0.912, "clean-100/seed1": 0.5}
    assert data["auc"]["dsmil"] == {"clean-100/seed0": 0.9, "clean-100/seed1": 0.9}
    assert ("monai_att_trans_concat", "clean-100/seed0", 0.912) in written and len(written) == 4
    assert not [p for p in tmp_path.iterdir() if p.name != "rule.json"]  # written through a temporary name
    chosen, rows = choose_default(data["auc"], data["grid"], {"dsmil": 1, "monai_att_trans_concat": 2})
    assert chosen == "dsmil" and [(r["model"], r["cells"]) for r in rows] == [("dsmil", 2), ("monai_att_trans_concat", 2)]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"rows": {}}))
    with pytest.raises(SystemExit, match="other.json: not a default-model rule file"):
        record_cells(bad, "clean", 100, reports)
    with pytest.raises(SystemExit):
        main(["--record", str(rule), "--train_recipe", "published", "--models", "dsmil"])
    assert json.loads(rule.read_text()) == data


def test_denormal_benchmark_plants_denormals_and_compares_flushing(tmp_path):
    """The benchmark's model holds the planted denormals (|x| below float32's smallest normal, not zero), its
    three rows and ratios come out, and torch's flushing is left off (its default) afterwards."""
    import torch

    from scripts.benchmarks.denormal import denormal_count, main, with_denormals
    from scripts.mil.registry import build_model

    net = build_model("monai_att_trans_20x", in_features=16, num_clusters=8)
    torch.set_flush_denormal(True)  # as after any network was built in this process: planting and counting still work
    planted = with_denormals(net, 0.05)
    weights = sum(p.numel() for p in net.parameters() if p.dim() >= 2)
    assert 0.03 * weights < planted < 0.07 * weights and denormal_count(net) == planted
    torch.set_flush_denormal(False)
    w = next(p for p in net.parameters() if p.dim() >= 2)
    small = w[(w != 0) & (w.abs() < torch.finfo(torch.float32).tiny)]
    assert small.numel() > 0 and small.abs().max() < torch.finfo(torch.float32).tiny  # true denormals, by value too
    main(["--features", "16", "--steps", "1", "--json", str(tmp_path / "d.json")])
    out = json.loads((tmp_path / "d.json").read_text())
    assert [r["weights"] for r in out["rows"]] == ["denormals, flush_denormal off", "denormals, flush_denormal on",
                                                    "zeroed, flush_denormal off"]
    assert out["rows"][2]["denormal_weights"] == 0 and out["rows"][0]["denormal_weights"] > 0
    assert set(out["ratios"]) == {"train_flush_vs_off", "infer_flush_vs_off", "train_flush_vs_zeroed"}
    assert (torch.tensor([1e-30]) * 1e-10).item() != 0.0  # flushing off again


def test_tasks_summary_of_survival_reports_keeps_the_pooled_c_index():
    from scripts.benchmarks.tasks import summarise as tasks_summarise

    def rep(joint, dsmil, single):
        models = {n: {"combined": {"c_index": c, "c_index_pooled": c - 0.02}, "mean": {"c_index": c},
                      "ci95": {"c_index": {"low": c - 0.05, "high": c + 0.05}}} for n, c in
                  (("csmil_joint", joint), ("dsmil", dsmil), ("deepattnmisl_20x", single))}
        return {"protocol": {"task": "survival"}, "models": models}

    rows, ratios = tasks_summarise({0: rep(0.72, 0.70, 0.60), 1: rep(0.74, 0.72, 0.62)})
    assert [r["model"] for r in rows] == ["csmil_joint", "dsmil", "deepattnmisl_20x"]
    assert rows[0]["c_index_combined"] == pytest.approx(0.73) and rows[0]["c_index_pooled"] == pytest.approx(0.71)
    assert ratios["joint_vs_best_single"] == pytest.approx(0.73 / 0.61) and ratios["joint_vs_default"] == pytest.approx(0.73 / 0.71)


def test_burden_concordance_tells_counting_from_presence(tmp_path):
    """The survival benchmark's analysis: a model scoring the burden equals the count oracle; one scoring only
    presence ties burdens 1 and 2 (c-index 0.5 on that pair) and equals the presence oracle; inputs are read from the
    protocol's run folders, and two runs of one split are refused."""
    import json

    from scripts.benchmarks.tasks import burden_concordance, read_burden_inputs

    rng = np.random.default_rng(0)
    slides = {}
    for p in range(60):
        b = p % 3
        t = float(60 * 0.5 ** b * np.exp(0.35 * rng.standard_normal()))
        slides[f"p{p}-s0"] = {"patient_id": f"p{p}", "burden": b, "time": t, "event": int(p % 5 != 0)}
    risks = {"counts": {s: v["burden"] + 0.0 for s, v in slides.items()},
             "presence": {s: float(v["burden"] > 0) for s, v in slides.items()}}
    rows = {r["model"]: r for r in burden_concordance(slides, risks)}
    assert set(rows) == {"oracle_count", "oracle_presence", "counts", "presence"}
    for key in ("c_index", "c_index_0v1", "c_index_0v2", "c_index_1v2"):
        assert rows["counts"][key] == rows["oracle_count"][key]
        assert rows["presence"][key] == rows["oracle_presence"][key]
    assert rows["presence"]["c_index_1v2"] == 0.5 and rows["counts"]["c_index_1v2"] > 0.6
    assert rows["presence"]["c_index"] < rows["counts"]["c_index"]
    assert rows["counts"]["patients"] == 60

    work = tmp_path / "survival-60"
    (work / "data").mkdir(parents=True)
    lines = ["slide_id,patient_id,path,label,mpp,time,event"] + [
        f"{s},{v['patient_id']},slides/{s}.tif,{v['burden']},,{v['time']},{v['event']}" for s, v in slides.items()]
    (work / "data" / "manifest.csv").write_text("\n".join(lines) + "\n")
    ids = sorted(slides)
    for i, part in enumerate((ids[:30], ids[30:])):
        run = work / "out-seed0" / "evaluation" / "runs" / "counts" / f"split_{i}-abc"
        run.mkdir(parents=True)
        (run / "predictions.json").write_text(json.dumps({"test": {s: risks["counts"][s] for s in part}}))
    read_slides, read_risks = read_burden_inputs(work, 0)
    assert read_risks == {"counts": risks["counts"]}
    assert read_slides[ids[0]]["split"] == "split_0" and read_slides[ids[-1]]["split"] == "split_1"
    # within splits: a model whose scale differs per split still counts perfectly; pooled across them it does not
    shifted = {s: risks["counts"][s] + (10.0 if read_slides[s]["split"] == "split_1" else 0.0) for s in ids}
    within = {r["model"]: r for r in burden_concordance(read_slides, {"shifted": shifted})}
    pooled = {r["model"]: r for r in burden_concordance(slides, {"shifted": shifted})}
    assert within["shifted"]["c_index"] == within["oracle_count"]["c_index"] and pooled["shifted"]["c_index"] < within["shifted"]["c_index"]
    assert read_slides["p4-s0"]["time"] == pytest.approx(slides["p4-s0"]["time"])
    assert read_slides["p4-s0"]["burden"] == 1 and read_slides["p5-s0"]["event"] == 0
    stale = work / "out-seed0" / "evaluation" / "runs" / "counts" / "split_1-old"
    stale.mkdir()
    (stale / "predictions.json").write_text("{}")
    with pytest.raises(SystemExit, match="more than one run of a split"):
        read_burden_inputs(work, 0)


def test_lesion_coverage_reads_the_tiling_cache_and_its_effect_is_a_rank_correlation(tmp_path):
    """The survival benchmark's grid analysis: the best 20x patch's share of a lesion, from the tiling cache's centres
    (level 0, 0.5 µm/px) and the mask (8 µm/px); only the cache entries of the asked grid spacing are read."""
    import json

    from PIL import Image

    from scripts.benchmarks.tasks import coverage_effect, lesion_coverage

    work = tmp_path / "survival"
    (work / "data" / "masks").mkdir(parents=True)
    (work / "data" / "demo.json").write_text(json.dumps({"mask_mpp": 8.0}))
    mask = np.zeros((64, 64), np.uint8)  # 512 µm: a 20x patch (128 µm) is 16 mask pixels
    mask[8:16, 8:24] = 255  # 8 x 16 mask pixels: half of the patch centred at mask (16, 16) -> level 0 (256, 256)
    Image.fromarray(mask).save(work / "data" / "masks" / "a.png")
    Image.fromarray(np.zeros_like(mask)).save(work / "data" / "masks" / "b.png")
    tiling = {"scales_mpp": [0.5, 1.0, 2.0], "patch_size": 256}
    for sid, step, centres in (("a", None, [[256, 256], [768, 768]]), ("b", None, [[256, 256]]), ("a", 64, [[192, 256]])):
        d = work / "cache" / "tiles" / f"{sid}-{step}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"slide_id": sid, "mpp": 0.5, "tiling": {**tiling, "step_um": step}}))
        np.save(d / "coords.npy", np.asarray(centres, np.int64))
    assert lesion_coverage(work) == {"a": 0.5, "b": 0.0}
    assert lesion_coverage(work, 64) == {"a": pytest.approx(8 * 12 / 256)}  # shifted 4 mask pixels left

    slides = {f"s{i}": {"burden": 1 if i < 6 else 0} for i in range(8)}
    coverage = {f"s{i}": i / 10 for i in range(8)}
    effect = coverage_effect(slides, {"follows": {s: coverage[s] for s in slides}, "against": {s: -coverage[s] for s in slides}}, coverage)
    assert effect == {"follows": pytest.approx(1.0), "against": pytest.approx(-1.0)}


def test_killing_a_benchmark_ends_its_bundle_command_too(tmp_path):
    """``kill PID`` of a benchmark (SIGTERM) takes down the command it runs (``run_child``), which
    ``subprocess.run`` left training alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; from scripts.benchmarks.common import run_child; "
                               f"run_child([sys.executable, '-c', {child!r}], Path('.'))"], cwd=ROOT)
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    for _ in range(200):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child_pid, signal.SIGKILL)
        raise AssertionError("the benchmark's child outlived it")
