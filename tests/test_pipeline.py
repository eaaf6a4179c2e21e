"""Manifest validation, demo cohort, tiling/feature/cluster caches and splits (in-process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityRanged

from scripts.data.demo import DemoParams, render_slide
from scripts.data.manifest import read_manifest
from scripts.errors import BundleInputError
from scripts.features.clustering import cluster_cohort
from scripts.features.encoders import build_scale_encoders, feature_dim
from scripts.features.extraction import extract_cohort
from scripts.workflows.splits import check_no_leakage, train_val_split
from scripts.workflows.stages import prepare_cohort
from scripts.wsi.slide import SlideReader
from scripts.wsi.tiling import TilingParams
from scripts.wsi.transforms import LoadMultiScaleRegiond

SCALES = (0.5, 1.0, 2.0)
KEYS = ["scale_0", "scale_1", "scale_2"]


def _write(tmp_path, text):
    p = tmp_path / "manifest.csv"
    p.write_text(text)
    return p


def test_demo_cohort_is_deterministic_and_has_lesions(tiny_demo):
    records = read_manifest(tiny_demo)
    assert [r.label for r in records] == [0, 1, 0, 1]
    info = json.loads((tiny_demo.parent / "demo.json").read_text())["slides"]
    for r in records:
        kinds = [s["kind"] for s in info[r.slide_id]["structures"]]
        assert ("R+T" in kinds) == bool(r.label)
        assert "T" in kinds  # the fine cue alone occurs in both classes
        assert ("R+S" in kinds) or r.label  # the coarse cue alone occurs in negatives
        mask = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tiny_demo.parent / "masks" / f"{r.slide_id}.png"))
        assert (mask.max() > 0) == bool(r.label)
        with SlideReader(r.path) as s:
            assert s.mpp == pytest.approx(0.5) and s.level_count == 4
    a, _, _ = render_slide(1, DemoParams(size=512, ring_radius_um=20, texture_radius_um=10, ring_width_um=5), np.random.default_rng(3))
    b, _, _ = render_slide(1, DemoParams(size=512, ring_radius_um=20, texture_radius_um=10, ring_width_um=5), np.random.default_rng(3))
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "text, match",
    [
        ("slide_id,path,label\na,x.tif,0\n", "missing column"),
        ("slide_id,patient_id,path,label\na,p,{p},0\na,q,{p},1\n", "duplicate slide_id 'a'"),
        ("slide_id,patient_id,path,label\na,p,{p},maybe\n", "unknown label 'maybe'"),
        ("slide_id,patient_id,path,label\na,,{p},0\n", "empty patient_id"),
        ("slide_id,patient_id,path,label\na,p,missing.tif,0\n", "does not exist"),
        ("slide_id,patient_id,path,label,mpp\na,p,{p},0,fast\n", "not a number"),
    ],
)
def test_bad_manifests_name_the_row(tmp_path, cmu_svs, text, match):
    path = _write(tmp_path, text.format(p=cmu_svs))
    with pytest.raises(BundleInputError, match=match) as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_leakage_guard_and_patient_split():
    with pytest.raises(BundleInputError, match="patient 'p1' appears in both"):
        check_no_leakage({"train": ["a"], "val": ["b"]}, {"a": "p1", "b": "p1"})
    ids = [f"s{i}" for i in range(16)]
    patients = [f"p{i // 2}" for i in range(16)]  # two slides per patient
    labels = [(i // 2) % 2 for i in range(16)]
    tr, va = train_val_split(ids, patients, labels, val_fraction=0.25, seed=0)
    assert sorted(tr + va) == list(range(16))
    assert not {patients[i] for i in tr} & {patients[i] for i in va}
    assert {labels[i] for i in va} == {0, 1}
    with pytest.raises(BundleInputError, match="too few for 4 stratified patient folds"):
        train_val_split(ids[:8], patients[:8], labels[:8], val_fraction=0.25)


def test_transform_chain_gives_normalised_patches(tiny_demo):
    rec = read_manifest(tiny_demo)[1]
    chain = Compose(
        [
            LoadMultiScaleRegiond(KEYS, SCALES, 256),
            Resized(KEYS, spatial_size=(256, 256), mode="area"),
            ScaleIntensityRanged(KEYS, a_min=0, a_max=255, b_min=0.0, b_max=1.0),
            EnsureTyped(KEYS, dtype=torch.float32, track_meta=False),
        ]
    )
    out = chain({"path": rec.path, "centre": np.array([768, 768]), "mpp": float("nan")})
    for k in KEYS:
        assert tuple(out[k].shape) == (3, 256, 256)
        assert 0.0 <= float(out[k].min()) and float(out[k].max()) <= 1.0


@pytest.fixture(scope="module")
def store(tiny_demo, tmp_path_factory):
    """prepare -> extract -> cluster on the tiny demo, with an extraction counter."""
    cache = tmp_path_factory.mktemp("cache")
    records = read_manifest(tiny_demo)
    tiling = TilingParams(scales_mpp=SCALES, patch_size=256)
    up = prepare_cohort(records, cache, tiling, progress=False)
    chain = Compose([LoadMultiScaleRegiond(KEYS, SCALES, 256), Resized(KEYS, (256, 256), mode="area"),
                     ScaleIntensityRanged(KEYS, 0, 255, 0.0, 1.0), EnsureTyped(KEYS, dtype=torch.float32, track_meta=False)])
    encoders = build_scale_encoders("tiny", 3, seed=0)

    def run(encs=encoders, tiles=up["tiles"]):
        return extract_cohort(records, tiles, cache / "features", encs, "tiny", chain, KEYS, {"v": 1}, batch_size=16, progress=False)

    return {"records": records, "up": up, "run": run, "cache": cache, "tiling": tiling}


def test_feature_store_layout_and_cache(store):
    entries = store["run"]()
    assert len(entries) == 4
    for e, tdir in zip(entries, store["up"]["tiles"]):
        f = e.features()
        assert isinstance(f, np.memmap) and f.dtype == np.float16
        n = len(np.load(tdir / "coords.npy"))
        assert f.shape == (n, 3, feature_dim("tiny"))
        assert np.array_equal(e.coords(), np.load(tdir / "coords.npy"))
        assert e.meta["encoders"][0]["weights_sha"] != e.meta["encoders"][1]["weights_sha"]
    before = {e.path: (e.path / "features.npy").stat().st_mtime_ns for e in entries}
    again = store["run"]()  # cache hit: nothing rewritten
    assert [e.path for e in again] == list(before)
    assert all((p / "features.npy").stat().st_mtime_ns == t for p, t in before.items())
    # other encoder weights: cache miss, new entries
    other = store["run"](encs=build_scale_encoders("tiny", 3, seed=7))
    assert not set(e.path for e in other) & set(before)
    assert not list((store["cache"] / "features").glob(".tmp-*"))


def test_tiling_change_misses_the_cache(store):
    params = TilingParams(scales_mpp=SCALES, patch_size=256, min_tissue=0.9)
    up = prepare_cohort(store["records"], store["cache"], params, progress=False)
    assert set(up["tiles"]).isdisjoint(store["up"]["tiles"])
    again = prepare_cohort(store["records"], store["cache"], store["tiling"], progress=False)
    assert again["tiles"] == store["up"]["tiles"]


def test_clusters_are_seeded_and_cached(store):
    entries = store["run"]()
    cluster_cohort(entries, k=8, scale_index=2, seed=0, progress=False)
    first = [e.clusters() for e in entries]
    for c, e in zip(first, entries):
        assert c.shape == (e.num_patches,) and c.min() >= 0 and c.max() < 8
        assert len(np.unique(c)) == 8
    stamp = (entries[0].path / "clusters.npy").stat().st_mtime_ns
    cluster_cohort(entries, k=8, scale_index=2, seed=0, progress=False)
    assert (entries[0].path / "clusters.npy").stat().st_mtime_ns == stamp
    cluster_cohort(entries, k=4, scale_index=0, seed=0, progress=False)
    assert entries[0].clusters().max() < 4 and entries[0].cluster_params()["k"] == 4
