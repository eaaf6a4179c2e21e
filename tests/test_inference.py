"""Slide inference and attention maps: real SVS, demo localisation, export formats."""

from __future__ import annotations

import csv
import json

import numpy as np
import openslide
import pytest
from PIL import Image

from conftest import run_bundle
from scripts.inference.outputs import localisation_auroc
from scripts.inference.predict import full_bag
from scripts.maps.export import colormap, normalise_per_scale, rasterise, write_geojson

SCALES = ["20x", "10x", "5x"]


def test_normalisation_puts_each_scale_min_at_0_and_max_at_1():
    v = np.array([[0.1, 5.0, 2.0], [0.3, 7.0, 2.0], [0.2, 6.0, 2.0]])
    n = normalise_per_scale(v)
    assert n.min(0).tolist() == [0, 0, 0] and n.max(0).tolist() == [1, 1, 0]  # constant column -> 0
    assert n[2, 0] == pytest.approx(0.5)


def test_full_bag_holds_every_patch_once():
    clusters = np.array([2, 0, 2, 2, 1, 0])
    idx, mask = full_bag(clusters, 4)
    assert idx.shape == (12,) and sorted(idx[mask].tolist()) == list(range(6))
    assert all(clusters[i] == k for k in range(4) for i in idx[k * 3 : (k + 1) * 3] if i >= 0)


def test_rasterise_and_colormap():
    heat = rasterise(np.array([[16.0, 16.0]]), np.array([0.7]), footprint_px=16, shape=(8, 8), scale=4)
    assert np.isnan(heat[0, 0]) and heat[3, 3] == pytest.approx(0.7) and np.isfinite(heat[2:6, 2:6]).all()
    rgb = colormap(np.array([0.0, 1.0]))
    assert rgb.dtype == np.uint8 and rgb[0].sum() < rgb[1].sum()


def test_localisation_auroc_scores_attention_against_mask():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 5:] = 255
    coords = np.array([[16, 16], [48, 16], [112, 16], [144, 16]], float)  # mask px = 16 level-0 px
    att = np.array([[0.1, 0.9], [0.2, 0.8], [0.9, 0.1], [0.8, 0.2]])
    assert localisation_auroc(coords, att, mask, mask_mpp=8.0, slide_mpp=0.5) == [1.0, 0.0]


def test_geojson_is_a_qupath_feature_collection(tmp_path):
    write_geojson(tmp_path / "a.geojson", np.array([[100, 200]]), 50, {"attention 20x": np.array([0.5])})
    gj = json.loads((tmp_path / "a.geojson").read_text())
    f = gj["features"][0]
    assert gj["type"] == "FeatureCollection" and f["geometry"]["type"] == "Polygon"
    assert f["geometry"]["coordinates"][0][0] == [75.0, 175.0] and f["properties"]["objectType"] == "detection"
    assert f["properties"]["measurements"] == {"attention 20x": 0.5}


@pytest.mark.slow
def test_inference_on_real_svs(trained, cmu_svs, tmp_path):
    out = tmp_path / "pred"
    run_bundle("inference.yaml", "inference", input=str(cmu_svs), output_dir=str(out), ckpt_dir=str(trained / "models"), num_bags=20)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 1 and rows[0]["slide_id"] == "CMU-1-Small-Region"
    assert 0.0 <= float(rows[0]["probability"]) <= 1.0 and rows[0]["label"] in ("0", "1")
    sdir = out / "CMU-1-Small-Region"
    slide = openslide.OpenSlide(str(cmu_svs))
    w0, h0 = slide.dimensions
    for s in SCALES:
        png = Image.open(sdir / f"attention_{s}.png")
        assert png.mode == "RGB" and png.size[0] > 100
        heat = openslide.OpenSlide(str(sdir / f"attention_{s}.tif"))
        assert float(heat.properties["openslide.mpp-x"]) == pytest.approx(8.0)
        assert heat.dimensions == (int(np.ceil(w0 * 0.499 / 8.0)), int(np.ceil(h0 * 0.499 / 8.0)))
        assert heat.level_count >= 1
    gj = json.loads((sdir / "attention.geojson").read_text())
    pts = np.array([p for f in gj["features"] for p in f["geometry"]["coordinates"][0]])
    assert len(gj["features"]) == int(rows[0]["num_patches"])
    assert pts[:, 0].min() >= 0 and pts[:, 1].min() >= 0 and pts[:, 0].max() <= w0 and pts[:, 1].max() <= h0
    for s in SCALES:
        vals = np.array([f["properties"]["measurements"][f"attention {s}"] for f in gj["features"]])
        assert vals.min() == 0.0 and vals.max() == pytest.approx(1.0)


@pytest.mark.slow
def test_inference_reports_localisation_on_demo(trained, tmp_path):
    out = tmp_path / "pred"
    run_bundle("inference.yaml", input=str(trained / "demo"), output_dir=str(out), ckpt_dir=str(trained / "models"), num_bags=10)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    positives = [r for r in rows if r["true_label"] == "1"]
    assert len(rows) == 4 and len(positives) == 2
    for row in positives:
        for s in SCALES:
            assert 0.0 <= float(row[f"localisation_auroc_{s}"]) <= 1.0
    summary = json.loads((out / "localisation.json").read_text())
    assert set(summary) == set(SCALES)


@pytest.mark.parametrize("patch_size", [128, 256])
def test_map_footprint_is_the_tiled_patch_size(tmp_path, patch_size):
    """The GeoJSON squares and heatmaps cover the finest patch as the slide was tiled, not a fixed 256 px."""
    from types import SimpleNamespace

    from scripts.inference.outputs import write_slide_outputs
    from scripts.inference.predict import SlidePrediction
    from scripts.wsi.pyramid import write_pyramid

    img = np.random.default_rng(0).integers(60, 200, (1024, 1024, 3), dtype=np.uint8)
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=0.25, downsamples=(1, 2, 4), compression="deflate")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "meta.json").write_text(json.dumps({"mpp": 0.25, "path": str(slide), "level_dims": [[1024, 1024]],
                                                 "tiling": {"patch_size": patch_size, "backend": "openslide"}}))
    coords = np.array([[512, 512]])
    entry = SimpleNamespace(slide_id="s", label=1, meta={"tiles_dir": str(tiles)}, num_patches=1, coords=lambda: coords)
    pred = SlidePrediction("s", 0.7, np.ones((1, 3), np.float32), np.full((1, 3), 1 / 3, np.float32), 0.0)
    write_slide_outputs(entry, pred, tmp_path / "out", [0.5, 1.0, 2.0])
    ring = json.loads((tmp_path / "out" / "s" / "attention.geojson").read_text())["features"][0]["geometry"]["coordinates"][0]
    xs = [p[0] for p in ring]
    assert max(xs) - min(xs) == pytest.approx(patch_size * 0.5 / 0.25)  # finest patch (0.5 µm/px) in level-0 px (0.25)


def test_tensorboard_logs_the_loss_every_n_iterations_and_validation_every_epoch(trained):
    """``log_every_iterations`` (3 in the fixture: 2 epochs of 2 iterations) thins the per-iteration loss
    (``train_loss_iteration``, stepped by iteration); the epoch means (``train_loss``, ``val_*``) are stepped by epoch,
    each in a tag of its own (one tag holding both put iteration and epoch steps on one axis)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((trained / "out" / "logs").glob("events.out.tfevents.*"))
    steps: dict[str, list[int]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    assert sorted(steps["train_loss_iteration"]) == [3], steps
    assert sorted(steps["train_loss"]) == [1, 2], steps
    assert sorted(steps["val_loss"]) == [1, 2] and sorted(steps["val_auc"]) == [1, 2], steps
