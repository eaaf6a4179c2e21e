"""The ``on_error`` policy: bad slides are skipped into failures.csv, the rest finishes, the exit code says so."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_DEMO
from scripts.data.manifest import read_manifest
from scripts.errors import BundleInputError
from scripts.workflows import failures
from scripts.wsi.pyramid import write_pyramid


def _cohort_with_bad_slides(tiny_demo, tmp_path):
    """The tiny demo's slides plus a non-slide file and a blank (tissue-free) slide."""
    (tmp_path / "notes.svs").write_text("not a slide")
    write_pyramid(tmp_path / "blank.tif", np.full((1024, 1024, 3), 243, np.uint8), mpp=0.5, downsamples=(1, 2))
    rows = [f"{r.slide_id},{r.patient_id},{r.path},{r.label}" for r in read_manifest(tiny_demo)]
    rows += ["bad-file,px1,notes.svs,1", "blank,px2,blank.tif,0"]
    m = tmp_path / "manifest.csv"
    m.write_text("slide_id,patient_id,path,label\n" + "\n".join(rows) + "\n")
    return m


@pytest.mark.slow
def test_skip_policy_finishes_the_good_slides_and_exits_non_zero(tiny_demo, tmp_path):
    manifest = _cohort_with_bad_slides(tiny_demo, tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "cluster", "--config_file", "configs/train.yaml",
           "--manifest", str(manifest), "--dataset_dir", str(tmp_path), "--output_dir", str(out), "--progress", "False"]
    r = subprocess.run([*cmd, "--on_error", "skip"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "2 slide(s) skipped" in r.stderr and "failures.csv" in r.stderr
    rows = list(csv.DictReader((out / "failures.csv").open()))
    assert {x["slide_id"]: x["stage"] for x in rows} == {"bad-file": "prepare", "blank": "prepare"}
    assert all(x["reason"] and x["fix"] for x in rows)
    store = out / "cache" / "features"
    done = [p for p in store.iterdir() if (p / "clusters.npy").is_file()]
    assert len(done) == TINY_DEMO.num_patients  # every good slide went through to clusters
    # the default policy stops at the first bad slide with one line naming it
    r = subprocess.run([*cmd, "--output_dir", str(tmp_path / "out2")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "notes.svs" in last and "Fix:" in last


class _FailOn:
    """Raises the input error a truncated slide gives, for one slide."""

    def __init__(self, inner, path):
        self.inner, self.path = inner, path

    def __call__(self, item):
        if item["path"] == self.path:
            raise BundleInputError(self.path, "reading level 0 at (0, 0) failed (injected)", "re-copy the slide")
        return self.inner(item)


def test_extraction_skips_a_slide_that_fails_while_reading(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.setattr(failures, "_FAILURES", [])
    monkeypatch.setattr(failures, "_HOOKED", True)  # no exit summary inside pytest
    from test_features import KEYS, _chain

    from scripts.features.encoders import build_scale_encoders
    from scripts.features.extraction import extract_cohort
    from scripts.workflows.stages import prepare_cohort
    from scripts.wsi.tiling import TilingParams

    records = read_manifest(tiny_demo)
    up = prepare_cohort(records, tmp_path / "cache", TilingParams(max_patches=8, seed=0), progress=False)
    bad = records[1].path
    kwargs = dict(batch_size=8, progress=False, output_dir=tmp_path)
    entries = extract_cohort(records, up["tiles"], tmp_path / "store", build_scale_encoders("tiny", 3), "tiny",
                             _FailOn(_chain(), bad), KEYS, {"v": 1}, on_error="skip", **kwargs)
    assert [e.slide_id for e in entries] == [r.slide_id for r in records if r.path != bad]
    assert [f["slide_id"] for f in failures.failures()] == [records[1].slide_id]
    assert (tmp_path / "failures.csv").read_text().count("\n") == 2  # header + the failed slide
    with pytest.raises(Exception) as err:  # default policy: the error stops the run
        extract_cohort(records, up["tiles"], tmp_path / "store2", build_scale_encoders("tiny", 3), "tiny",
                       _FailOn(_chain(), bad), KEYS, {"v": 1}, **kwargs)
    from scripts.errors import find_input_error

    assert find_input_error(err.value).path == bad


def test_extraction_skips_a_slide_whose_stain_views_fail(tiny_demo, tmp_path, monkeypatch):
    """A slide whose features are cached but whose stain views fail (its file was truncated since) is left out with
    on_error='skip' and recorded, as a slide whose features fail: training reads every returned entry's views."""
    import dataclasses
    import shutil

    monkeypatch.setattr(failures, "_FAILURES", [])
    monkeypatch.setattr(failures, "_HOOKED", True)
    from test_stain_views import KEYS, _chain

    from scripts.features.encoders import build_scale_encoders
    from scripts.features.extraction import extract_cohort
    from scripts.features.stain_views import stain_views, views_path
    from scripts.workflows.stages import prepare_cohort
    from scripts.wsi.tiling import TilingParams

    records = read_manifest(tiny_demo)
    copy = tmp_path / Path(records[1].path).name
    shutil.copyfile(records[1].path, copy)
    records[1] = dataclasses.replace(records[1], path=str(copy))
    up = prepare_cohort(records, tmp_path / "cache", TilingParams(max_patches=8, seed=0), progress=False)
    encoders = build_scale_encoders("tiny", 3)
    kwargs = dict(batch_size=8, progress=False, output_dir=tmp_path)
    first = extract_cohort(up["records"], up["tiles"], tmp_path / "store", encoders, "tiny", _chain(), KEYS, {"v": 1}, **kwargs)
    assert len(first) == len(records)
    copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 3])  # the slide goes bad after its features were cached
    spec = stain_views(2)
    entries = extract_cohort(up["records"], up["tiles"], tmp_path / "store", encoders, "tiny", _chain(), KEYS, {"v": 1},
                             on_error="skip", stain_views=spec, **kwargs)
    assert [e.slide_id for e in entries] == [r.slide_id for r in records if r.path != str(copy)]
    assert all(views_path(e.path, spec).is_file() for e in entries)
    assert not views_path(first[1].path, spec).exists()
    assert [(f["stage"], f["slide_id"]) for f in failures.failures()] == [("extract", records[1].slide_id)]


def _train_cmd(data, out, epochs):
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml",
            "--dataset_dir", str(data), "--output_dir", str(out / "run"), "--cache_dir", str(out.parent / "cache"),
            "--ckpt_dir", str(out / "models"), "--demo_num_patients", str(TINY_DEMO.num_patients),
            "--demo_slide_size", str(TINY_DEMO.size), "--val_fraction", "0.5", "--bags_per_slide", "48",
            "--max_epochs", str(epochs), "--progress", "False"]


def _load_all(out):
    """Every final-named artefact must be complete at any moment: checkpoints load, JSON parses."""
    import json

    import torch

    for p in list(out.rglob("*.pt")):
        if not p.name.startswith(".tmp"):
            torch.load(p, map_location="cpu", weights_only=True)
    for p in list(out.rglob("*.json")):
        if not p.name.startswith(".tmp"):
            json.loads(p.read_text())


@pytest.mark.slow
def test_training_killed_mid_run_resumes_to_the_same_result(tmp_path):
    import json
    import signal
    import time

    import torch

    data = tmp_path / "demo"
    epochs = 8
    r = subprocess.run(_train_cmd(data, tmp_path / "a", epochs), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "a" / "run" / "resume").exists()  # removed when training ends
    b = tmp_path / "b"
    proc = subprocess.Popen(_train_cmd(data, b, epochs), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume, killed_after = b / "run" / "resume" / "resume.pt", None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if resume.is_file():
            _load_all(b)
            epoch = torch.load(resume, map_location="cpu", weights_only=True)["epoch"]
            if epoch >= 3:
                proc.send_signal(signal.SIGKILL)
                killed_after = epoch
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_after is not None and killed_after < epochs, "training ended before it could be killed"
    _load_all(b)
    r = subprocess.run(_train_cmd(data, b, epochs), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming training after epoch" in r.stdout + r.stderr
    sa = json.loads((tmp_path / "a" / "run" / "training_summary.json").read_text())
    sb = json.loads((b / "run" / "training_summary.json").read_text())
    assert sa["history"] == sb["history"] and sa["best"] == sb["best"] and sb["epochs"] == epochs
    ma = torch.load(tmp_path / "a" / "models" / "model.pt", map_location="cpu", weights_only=True)
    mb = torch.load(b / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
