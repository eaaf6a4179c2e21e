"""Slide and patient ids are data, never paths: folders named after a slide stay inside their output folder
(scripts.data.ids), the id itself is kept verbatim, and manifests in other encodings are read."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_bundle
from scripts.data.ids import case_clash, folder_name, is_plain

EVIL = ["../../escape", "/abs/olute", "case/1", "C:\\x\\y", "..", ".", "tab\tand\x07bell", "a" * 300, "CON", "nul.txt",
        "x-0123456789ab", "Résumé 1", "  padded  ", "-lead", "end."]


def _inside(name: str, folder: Path) -> bool:
    target = (folder / name).resolve()
    return target.parent == folder.resolve() and target.name == name


@pytest.mark.parametrize("identifier", ["TCGA-AA-3812", "demo-p001-s0", "CMU-1-Small-Region", "a.b_c+d", "s0"])
def test_a_plain_id_is_its_own_folder_name(identifier):
    assert is_plain(identifier) and folder_name(identifier) == identifier


@pytest.mark.parametrize("identifier", EVIL)
def test_any_other_id_gets_a_safe_hashed_name_inside_its_folder(identifier, tmp_path):
    name = folder_name(identifier)
    assert name != identifier and not is_plain(identifier)
    assert _inside(name, tmp_path), name  # one path component below the output folder, never above or beside it
    assert len(name) <= 73 and name.isascii() and name.isprintable()
    assert name.split(".")[0].lower() not in {"con", "nul", "prn", "aux"}
    assert name[-13] == "-" and int(name[-12:], 16) >= 0  # ends in the id's hash: distinct from every plain name


def test_distinct_ids_get_distinct_names_even_ignoring_case():
    ids = EVIL + ["Case1", "case 1", "case_1", "case/1 ", "TCGA-AA-3812", "x-0123456789AB"]
    names = [folder_name(i) for i in ids]
    assert len({n.casefold() for n in names}) == len(ids)
    assert case_clash(["A1", "b", "a1"]) == (0, 2) and case_clash(["a", "b"]) is None


def test_the_manifest_keeps_the_ids_verbatim_and_reads_other_encodings(tmp_path, caplog):
    from scripts.data.manifest import read_manifest
    from scripts.wsi.pyramid import write_pyramid

    img = np.random.default_rng(0).integers(60, 200, (256, 256, 3), dtype=np.uint8)
    write_pyramid(tmp_path / "s.tif", img, mpp=0.5, downsamples=(1,), compression="deflate")
    text = "slide_id,patient_id,path,label\nbiopsie-é/1,patient ü,s.tif,1\n"
    for encoding, warned in [("utf-8", False), ("utf-8-sig", False), ("utf-16", False), ("cp1252", True), ("latin-1", True)]:
        (tmp_path / "manifest.csv").write_bytes(text.encode(encoding))
        caplog.clear()
        records = read_manifest(tmp_path / "manifest.csv")
        assert (records[0].slide_id, records[0].patient_id) == ("biopsie-é/1", "patient ü"), encoding
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "not UTF-8" in r.getMessage()]
        assert bool(warnings) == warned, (encoding, warnings)
        if warned:
            assert "manifest.csv" in warnings[0] and "Windows-1252" in warnings[0] and "line 2" in warnings[0]
    (tmp_path / "manifest.csv").write_bytes(b"slide_id,patient_id,path,label\nx\x81y,p,s.tif,1\n")  # 0x81: no cp1252 character
    assert read_manifest(tmp_path / "manifest.csv")[0].slide_id == "x\x81y"  # read as Latin-1


def test_inference_with_hostile_ids_writes_only_inside_its_folders(trained, tmp_path):
    """Tiles, feature store entries and slide folders of ids such as '../../escape' (and patient ids like it) stay
    inside cache_dir and output_dir; predictions.csv and prediction.json carry the ids verbatim."""
    demo = trained / "demo"
    rows = list(csv.DictReader(open(demo / "manifest.csv")))
    hostile = ["../../escape", "case/1", "C:\\x\x07", "a" * 300][: len(rows)]
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    with open(work / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r, sid in zip(rows, hostile):
            w.writerow({**r, "slide_id": sid, "patient_id": f"../../{r['patient_id']}/x", "path": str((demo / r["path"]).resolve())})
    before = sorted(p for p in tmp_path.rglob("*"))
    out, cache = work / "out", work / "cache"
    run_bundle("inference.yaml", input=str(work / "manifest.csv"), output_dir=str(out), cache_dir=str(cache),
               ckpt_dir=str(trained / "models"), num_bags=5)
    written = sorted(set(tmp_path.rglob("*")) - set(before))
    assert written and all(p == out or p == cache or out in p.parents or cache in p.parents for p in written), written
    predictions = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["slide_id"] for r in predictions] == hostile
    for sid in hostile:
        sdir = out / folder_name(sid)
        assert json.loads((sdir / "prediction.json").read_text())["slide_id"] == sid
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(folder_name(s) for s in hostile)
    assert not [p for p in written if p.name.startswith(".tmp-")]
    assert not os.path.exists(tmp_path / "escape") and not os.path.exists(tmp_path / "deep" / "escape")


def test_a_folder_of_slides_whose_names_differ_only_in_case_is_refused(tmp_path):
    from scripts.errors import BundleInputError
    from scripts.inference.inputs import input_records

    (tmp_path / "A1.tif").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.svs").write_bytes(b"x")
    assert [r.slide_id for r in input_records(tmp_path)] == ["A1", "b"]
    (tmp_path / "a1.svs").write_bytes(b"x")
    with pytest.raises(BundleInputError, match=r"share the name \['A1', 'a1'\]"):
        input_records(tmp_path)
