"""MONAI Deploy: the exported model repository and the App SDK application, end to end on the real SVS."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, run_bundle
from scripts.deploy.export import encoder_dirs, export_model_repository, load_settings
from scripts.deploy.runtime import DeployModels
from scripts.errors import BundleInputError
from scripts.features.encoders import build_encoder
from scripts.mil.networks import CSMIL
from scripts.wsi.tiling import TilingParams

SETTINGS = {"scales_mpp": [0.5, 1.0, 2.0], "patch_size": 64, "num_clusters": 4, "encoder_arch": "tiny",
            "tiling": TilingParams(scales_mpp=(0.5, 1.0, 2.0), patch_size=64).to_dict()}


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _export(tmp_path):
    torch.manual_seed(0)
    net = CSMIL(in_features=128, num_clusters=4).eval()
    net.set_input_stats(torch.randn(128), torch.rand(128) + 0.5)
    encoders = [build_encoder("tiny", seed=s) for s in range(3)]
    repo = export_model_repository(tmp_path / "deploy", net, encoders, SETTINGS, ROOT / "configs" / "metadata.json")
    return repo, net, encoders


def test_export_writes_a_named_model_repository_the_sdk_accepts(tmp_path):
    from monai.deploy.core.models import ModelFactory

    repo, net, encoders = _export(tmp_path)
    assert sorted(p.name for p in repo.iterdir()) == sorted(["csmil", *encoder_dirs(SETTINGS["scales_mpp"])])
    assert encoder_dirs([0.5, 1.0, 2.0]) == ["encoder_20x", "encoder_10x", "encoder_5x"]
    model = ModelFactory.create(str(repo))  # the SDK's own loader, as AppContext uses it
    assert model.model_type == "named-model"
    assert sorted(k for k, _ in model.items()) == ["csmil", "encoder_10x", "encoder_20x", "encoder_5x"]
    assert {m.model_type for _, m in model.items()} == {"torch_script"}
    loaded = DeployModels(repo)
    assert loaded.settings["bundle_version"] == json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]
    assert loaded.metadata["name"] == json.loads((ROOT / "configs" / "metadata.json").read_text())["name"]
    assert loaded.tiling.patch_size == 64 and loaded.tiling.tissue.max_value == 235 and loaded.tiling.scales_mpp == (0.5, 1.0, 2.0)
    x, mask = torch.randn(2, 3, 16, 128), torch.rand(2, 16) > 0.3
    torch.testing.assert_close(loaded.network(x, mask), net(x, mask))
    att_ts, att = loaded.network.forward_attention(x, mask)[1], net.forward_attention(x, mask)[1]
    for key in ("scale", "patch", "cluster"):
        torch.testing.assert_close(att_ts[key], att[key])
    patches = torch.randn(2, 3, 64, 64)
    for ts, enc in zip(loaded.encoders, encoders):
        torch.testing.assert_close(ts(patches), enc(patches), rtol=1e-4, atol=1e-4)
    assert load_settings(repo / "csmil" / "model.ts")["num_clusters"] == 4


def test_export_replaces_its_own_repository_but_not_a_foreign_folder(tmp_path):
    repo, _, _ = _export(tmp_path)
    first = (repo / "csmil" / "model.ts").stat().st_mtime_ns
    _export(tmp_path)  # re-export over the earlier one
    assert (repo / "csmil" / "model.ts").stat().st_mtime_ns != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BundleInputError, match="not a model repository"):
        export_model_repository(foreign, CSMIL(in_features=128, num_clusters=4), [build_encoder("tiny")] * 3, SETTINGS)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_export_checks_one_encoder_per_scale(tmp_path):
    with pytest.raises(BundleInputError, match="2 encoders for 3 scales"):
        export_model_repository(tmp_path / "d", CSMIL(in_features=128, num_clusters=4), [build_encoder("tiny")] * 2, SETTINGS)
    assert not (tmp_path / "d").exists()


def test_the_app_rebuilds_the_patch_preprocessing_from_its_settings():
    """The exported settings hold the preprocessing as a MONAI config section that builds the same transforms as
    extraction (the store's signature: the app finds the bundle's features)."""
    from monai.bundle import ConfigParser

    from scripts.features.extraction import transform_signature
    from scripts.features.preprocessing import patch_preprocessing, preprocessing_section

    values = dict(scales_mpp=(0.5, 1.0, 2.0), patch_size=224, backend="tifffile", read_cell_um=512.0, mean=[0.5] * 3, std=[0.25] * 3)
    section = preprocessing_section(**values)
    assert json.loads(json.dumps(section)) == section and section["scales_mpp"] == [0.5, 1.0, 2.0]
    compose = ConfigParser({"p": section}).get_parsed_content("p")
    assert [type(t).__name__ for t in compose.transforms][:2] == ["LoadMultiScaleRegiond", "Resized"]
    assert transform_signature(compose) == transform_signature(patch_preprocessing(**values))


def test_missing_or_incomplete_repository_names_the_folder_and_the_export_command(tmp_path):
    with pytest.raises(BundleInputError, match="no csmil/model.ts.*configs/deploy.yaml"):
        DeployModels(tmp_path)
    repo, _, _ = _export(tmp_path)
    (repo / "encoder_10x" / "model.ts").unlink()
    with pytest.raises(BundleInputError, match="encoder_10x/model.ts"):
        DeployModels(repo)


def test_the_app_flushes_denormals_first_unless_told_not_to(monkeypatch):
    """The app sets the bundle's flush_denormal (CSMIL_FLUSH_DENORMAL, default on) before its input checks and its
    graph (threads started later inherit it: tests/test_config_layer.py); 0 keeps denormals; a bad value is one
    error naming the variable, exit code 1."""
    from scripts.deploy import app, main as deploy_main

    small = torch.tensor([1e-30])  # times 1e-10: a denormal, or zero when flushed
    seen = []

    def preflight(argv):
        seen.append((small * 1e-10).item() == 0.0)
        raise BundleInputError("slides", "stop here", "none")

    monkeypatch.setattr(app, "preflight", preflight)
    try:
        for value, flushed in ((None, True), ("0", False), ("yes", True)):
            torch.set_flush_denormal(not flushed)
            if value is None:
                monkeypatch.delenv("CSMIL_FLUSH_DENORMAL", raising=False)
            else:
                monkeypatch.setenv("CSMIL_FLUSH_DENORMAL", value)
            assert deploy_main.main(["-i", "x"]) == 1 and seen[-1] == flushed
        monkeypatch.setenv("CSMIL_FLUSH_DENORMAL", "maybe")
        with pytest.raises(BundleInputError, match="CSMIL_FLUSH_DENORMAL: 'maybe' is not a switch.*1 .* or 0"):
            deploy_main.set_cpu_numerics()
    finally:
        torch.set_flush_denormal(False)
    assert len(seen) == 3
    assert "CSMIL_FLUSH_DENORMAL" in (ROOT / "docs" / "deploy.md").read_text()


def test_packaging_files_are_in_step_with_the_bundle():
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    app = yaml.safe_load((ROOT / "deploy" / "app.yaml").read_text())
    assert str(app["application"]["version"]) == meta["version"]
    assert app["application"]["inputFormats"] == ["file"] and {"cpu", "gpu", "memory"} <= set(app["resources"])

    def names(path):
        out = set()
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                out.add(re.split(r"[<>=!~\[ ]", line)[0].lower())
        return out

    runtime, container, sdk = names(ROOT / "requirements.txt"), names(ROOT / "deploy" / "requirements.txt"), names(ROOT / "requirements-deploy.txt")
    assert runtime <= container, runtime - container
    assert sdk <= container, sdk - container
    assert (ROOT / "deploy" / "__main__.py").is_file()


@pytest.fixture(scope="module")
def deploy_repo(trained):
    """``run export`` of the trained demo model: ``<trained>/models/deploy``."""
    r = run("-m", "monai.bundle", "run", "export", "--config_file", "configs/deploy.yaml", "--ckpt_dir", str(trained / "models"))
    assert r.returncode == 0, r.stderr[-3000:]
    repo = trained / "models" / "deploy"
    assert (repo / "csmil" / "model.ts").is_file() and len(list(repo.glob("encoder_*/model.ts"))) == 3
    contract = DeployModels(repo).settings["contract"]  # the export carries what the model was trained with
    assert contract["scales_mpp"] == [0.5, 1.0, 2.0] and contract["in_features"] == 128 and len(contract["encoders"]) == 3
    return repo


@pytest.mark.slow
def test_deploy_app_on_the_real_svs_matches_bundle_inference(trained, deploy_repo, cmu_svs, tmp_path):
    models, repo = trained / "models", deploy_repo
    app_out = tmp_path / "app"
    r = run("deploy", "-i", str(cmu_svs), "-o", str(app_out), "-m", str(repo), "-w", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr[-3000:]
    ref_out = tmp_path / "ref"
    run_bundle("inference.yaml", input=str(cmu_svs), output_dir=str(ref_out), ckpt_dir=str(models))  # the bundle's own inference
    app_rows = list(csv.DictReader(open(app_out / "predictions.csv")))
    ref_rows = list(csv.DictReader(open(ref_out / "predictions.csv")))
    assert [r["slide_id"] for r in app_rows] == ["CMU-1-Small-Region"]
    for key in ("probability", "label", "num_patches"):
        assert app_rows[0][key] == ref_rows[0][key], key
    pred = json.loads((app_out / "CMU-1-Small-Region" / "prediction.json").read_text())
    assert pred["scales"] == ["20x", "10x", "5x"] and 0.0 <= pred["probability"] <= 1.0
    for name in ("attention_20x.png", "attention_10x.png", "attention_5x.png", "attention_scales.png",
                 "attention_20x.tif", "attention_10x.tif", "attention_5x.tif"):
        assert (app_out / "CMU-1-Small-Region" / name).stat().st_size > 0, name
    gj_app = json.loads((app_out / "CMU-1-Small-Region" / "attention.geojson").read_text())
    gj_ref = json.loads((ref_out / "CMU-1-Small-Region" / "attention.geojson").read_text())
    a = np.array([f["properties"]["measurements"]["attention 5x"] for f in gj_app["features"]])
    b = np.array([f["properties"]["measurements"]["attention 5x"] for f in gj_ref["features"]])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert list((tmp_path / "work" / "features").glob("CMU-1-Small-Region-*/features.npy"))  # -w holds the cache


@pytest.mark.slow
def test_a_stop_signal_ends_the_deploy_app_after_the_current_step_and_the_rerun_resumes(deploy_repo, cmu_svs, tmp_path):
    """Holoscan keeps the main thread (and would finish the whole input, then exit 0): the app stops at the next
    feature batch with exit 143, leaves no partial output, and the same command encodes only the rest."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(12):
        (inputs / f"s{i:02d}.svs").symlink_to(cmu_svs)
    cmd = [sys.executable, "deploy", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(deploy_repo), "-w", str(tmp_path / "work")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # SIGTERM (docker stop) once the second slide is encoded
        lines.append(line)
        if "encoded s01 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    err = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM): rerun the same command to resume"
    assert "multiscale_tiler_encoders: stopped by SIGTERM" in err and "[error]" not in err and "Traceback" not in err, err[-3000:]
    encoded = len(re.findall(r"encoded s\d\d ", err))
    assert 2 <= encoded < 12  # stopped part-way, not at the end of the input
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing downstream ran
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"extracting features of {12 - encoded} / 12 slides" in r.stderr  # the finished slides are not encoded again
    assert [row["slide_id"] for row in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))] == [f"s{i:02d}" for i in range(12)]


@pytest.mark.slow
def test_deploy_app_stops_on_a_truncated_slide_with_one_line_error(deploy_repo, cmu_svs, tmp_path):
    broken = tmp_path / "in" / "broken.svs"
    broken.parent.mkdir()
    broken.write_bytes(cmu_svs.read_bytes()[:5000])
    r = run("deploy", "-i", str(broken.parent), "-o", str(tmp_path / "out"), "-m", str(deploy_repo), timeout=300)
    assert r.returncode == 1
    assert f"error: {broken}: cannot be opened as a whole-slide image" in r.stderr
    log = r.stdout + r.stderr  # once, before the graph starts: no Holoscan executor error lines around it
    assert log.count("cannot be opened as a whole-slide image") == 1 and "[error]" not in log and "GXF" not in log, log[-2000:]
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.slow
def test_deploy_app_takes_a_missing_mpp_from_the_environment(deploy_repo, tcga_svs, tmp_path):
    """The real TCGA slide has no mpp: the app stops before any work, and runs with CSMIL_MPP."""
    r = run("deploy", "-i", str(tcga_svs), "-o", str(tmp_path / "no_mpp"), "-m", str(deploy_repo), timeout=300)
    assert r.returncode == 1 and f"error: {tcga_svs}: slide metadata has no microns-per-pixel" in r.stderr
    assert not (tmp_path / "no_mpp" / "cache").exists()
    env = {**os.environ, "CSMIL_MPP": "0.5", "CSMIL_DEVICE": "cpu"}
    r = subprocess.run([sys.executable, "deploy", "-i", str(tcga_svs), "-o", str(tmp_path / "out"), "-m", str(deploy_repo)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert rows[0]["slide_id"] == "TCGA-CR-7395-01A-01-TS1" and int(rows[0]["num_patches"]) > 0
    tiles_meta = json.loads(next((tmp_path / "out" / "cache" / "tiles").glob("*/meta.json")).read_text())
    assert tiles_meta["mpp"] == 0.5 and tiles_meta["mpp_source"] == "override"


def _as_survival(models: Path, out: Path) -> Path:
    """A copy of the trained demo checkpoint whose contract says survival with 2 time bins (its 2 logits become the
    hazards of the bins): the app's survival path on real weights and encoders without a second training run."""
    from scripts.checkpoint.contract import CONTRACT_KEY

    out.mkdir(parents=True)
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    meta = next(m for m in state._metadata.values() if isinstance(m, dict) and CONTRACT_KEY in m)
    meta[CONTRACT_KEY] = {**meta[CONTRACT_KEY], "task": "survival", "survival_bins": 2, "survival_cuts": [30.0]}
    torch.save(state, out / "model.pt")
    return out


@pytest.mark.slow
def test_deploy_app_writes_the_risk_of_a_survival_model(trained, cmu_svs, tmp_path):
    """A survival checkpoint exports with its task, and the app writes the same ``risk`` (no probability or label
    column) and the maps that the bundle's inference writes."""
    models = _as_survival(trained / "models", tmp_path / "models")
    run_bundle("deploy.yaml", "export", ckpt_dir=str(models))
    repo = models / "deploy"
    assert DeployModels(repo).settings["task"] == "survival" and DeployModels(repo).settings["class_names"] == []
    r = run("deploy", "-i", str(cmu_svs), "-o", str(tmp_path / "app"), "-m", str(repo), "-w", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CMU-1-Small-Region: risk " in r.stdout + r.stderr
    run_bundle("inference.yaml", input=str(cmu_svs), output_dir=str(tmp_path / "ref"), ckpt_dir=str(models), cache_dir=str(tmp_path / "work"))
    app_rows = list(csv.DictReader(open(tmp_path / "app" / "predictions.csv")))
    ref_rows = list(csv.DictReader(open(tmp_path / "ref" / "predictions.csv")))
    assert "risk" in app_rows[0] and not {"probability", "label"} & set(app_rows[0])
    assert app_rows[0]["risk"] == ref_rows[0]["risk"] and 0.0 < float(app_rows[0]["risk"]) < 1.0
    for name in ("attention_20x.tif", "attention_5x.png", "attention.geojson"):
        assert (tmp_path / "app" / "CMU-1-Small-Region" / name).stat().st_size > 0, name
