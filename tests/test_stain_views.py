"""Stain augmentation of MIL training: HED jitter, the stain views extraction stores, bags drawn from them, the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.data.manifest import read_manifest
from scripts.errors import BundleInputError
from scripts.features.encoders import build_scale_encoders
from scripts.features.extraction import extract_cohort
from scripts.features.stain import hed_jitter
from scripts.features.stain_views import StainViews, load_views, stain_views, views_path
from scripts.workflows.stages import prepare_cohort
from scripts.wsi.tiling import TilingParams

SCALES = (0.5, 1.0, 2.0)
KEYS = ["scale_0", "scale_1", "scale_2"]
SPEC = StainViews(2, sigma=0.3, bias=0.05, seed=0)


@pytest.fixture(scope="module")
def tiled(tiny_demo, tmp_path_factory):
    records = read_manifest(tiny_demo)
    up = prepare_cohort(records, tmp_path_factory.mktemp("cache"), TilingParams(scales_mpp=SCALES, max_patches=12, seed=0), progress=False)
    return up["records"], up["tiles"]


def _chain():
    from scripts.workflows.pipeline_config import pipeline_parser

    return pipeline_parser().get_parsed_content("preprocessing")


def _extract(tiled, store, transform=None, spec=None, stats=None, workers=0):
    records, tiles = tiled
    return extract_cohort(records, tiles, store, build_scale_encoders("tiny", 3), "tiny", transform or _chain(), KEYS, {"v": 1},
                          batch_size=8, num_workers=workers, progress=False, stats=stats, stain_views=spec)


class RestainedChain:
    """The patch chain run whole in the loader with the patches of slide ``i`` re-stained by ``factors[i]`` between the
    reader and the intensity transforms: an independent path to a stain view's features (the float path, which gives
    the device path's features bit for bit, tests/test_features.py)."""

    def __init__(self, chain, factors) -> None:
        ts = list(chain.transforms)
        first = next(i for i, t in enumerate(ts) if type(t).__name__ in ("ScaleIntensityRanged", "NormalizeIntensityd"))
        self.read, self.rest, self.factors = ts[:first], ts[first:], factors

    def __call__(self, item):
        for t in self.read:
            item = t(item)
        alpha, beta = self.factors[item["slide_index"]]
        for k in KEYS:
            x = torch.as_tensor(np.asarray(item[k]))
            item[k] = hed_jitter(x.unsqueeze(0), alpha[None], beta[None])[0]
        for t in self.rest:
            item = t(item)
        return item


def test_hed_jitter_identity_rounding_and_rows():
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    same = hed_jitter(x, torch.ones(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    assert same.dtype == torch.uint8 and torch.equal(same, x)  # no jitter: the pixels come back exactly
    alpha = torch.tensor([[1.2, 0.9, 1.0], [0.8, 1.1, 1.0], [1.0, 1.0, 1.3]], dtype=torch.float64)
    beta = torch.tensor([[0.05, -0.05, 0.0], [0.0, 0.02, 0.0], [-0.03, 0.0, 0.04]], dtype=torch.float64)
    batch = hed_jitter(x, alpha, beta)
    for i in range(3):  # each row with its own factors
        assert torch.equal(batch[i:i + 1], hed_jitter(x[i:i + 1], alpha[i:i + 1], beta[i:i + 1]))
    assert (batch.int() - x.int()).abs().float().mean() > 2
    # more haematoxylin darkens a grey pixel, most in red (H absorbs red most strongly)
    grey = torch.full((1, 3, 1, 1), 200, dtype=torch.uint8)
    dark = hed_jitter(grey, torch.tensor([[1.5, 1.0, 1.0]], dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    assert (dark.int() < grey.int()).all() and int(grey[0, 0] - dark[0, 0]) > int(grey[0, 2] - dark[0, 2])
    # tissue_od: white background keeps its colour under a shift, tissue does not
    px = torch.tensor([[[[255, 120]], [[255, 80]], [[255, 160]]]], dtype=torch.uint8)
    out = hed_jitter(px, torch.ones(1, 3, dtype=torch.float64), torch.tensor([[0.1, 0.1, 0.0]], dtype=torch.float64), tissue_od=0.15)
    assert torch.equal(out[..., 0], px[..., 0]) and not torch.equal(out[..., 1], px[..., 1])


def test_stain_view_settings():
    assert stain_views(0) is None
    spec = stain_views(3, 0.25, 0.1, seed=7)
    assert spec == StainViews(3, 0.25, 0.1, 7) and spec.settings()["method"] == "hed_jitter"
    a1, b1 = spec.factors("slide-a")
    a2, _ = spec.factors("slide-a")
    a3, _ = spec.factors("slide-b")
    assert a1.shape == b1.shape == (3, 3) and torch.equal(a1, a2) and not torch.equal(a1, a3)  # a function of settings and slide
    assert ((a1 >= 0.75) & (a1 <= 1.25)).all() and (b1.abs() <= 0.1).all()
    assert spec.file_name != StainViews(3, 0.25, 0.1, 8).file_name != StainViews(2, 0.25, 0.1, 7).file_name
    with pytest.raises(ValueError, match="views >= 1"):
        StainViews(0)
    with pytest.raises(ValueError, match="sigma"):
        StainViews(2, sigma=1.5)  # alpha would go negative


def test_extraction_stores_views_equal_to_encoding_restained_patches(tiled, tmp_path):
    records, _ = tiled
    plain = _extract(tiled, tmp_path / "store")
    stats = {}
    entries = _extract(tiled, tmp_path / "store", spec=SPEC, stats=stats)
    assert [e.path for e in entries] == [e.path for e in plain]  # same entries: the views add a file, not a new hash
    assert stats["computed"] == [] and sorted(stats["views_computed"]) == sorted(r.slide_id for r in records)
    for e in entries:
        views = load_views(e, SPEC)
        assert views.dtype == np.float16 and views.shape == (2, *e.features().shape)
        assert not np.array_equal(views[0], views[1]) and not np.array_equal(views[0], e.features())
    # view v, independently: the float chain in the loader with the slide re-stained between reader and intensity
    for v in range(SPEC.views):
        factors = [tuple(f[v] for f in SPEC.factors(r.slide_id)) for r in records]
        ref = _extract(tiled, tmp_path / f"ref{v}", transform=RestainedChain(_chain(), factors))
        for e, r in zip(entries, ref):
            np.testing.assert_array_equal(load_views(e, SPEC)[v], r.features())
    again = {}
    _extract(tiled, tmp_path / "store", spec=SPEC, stats=again, workers=2)  # nothing left to encode
    assert again["computed"] == [] and again["views_computed"] == []
    assert not list((tmp_path / "store").rglob("*.lock")) and not [p for p in (tmp_path / "store").rglob("*") if ".tmp" in p.name]


def test_bags_draw_the_original_or_a_view(tiled, tmp_path):
    from scripts.data.bags import BagDataset
    from scripts.features.clustering import cluster_cohort

    entries = cluster_cohort(_extract(tiled, tmp_path / "store", spec=SPEC), k=2, scale_index=2, seed=0, progress=False)
    plain = BagDataset(entries, num_clusters=2, per_cluster=4, bags_per_slide=2, seed=0)
    with_views = BagDataset(entries, num_clusters=2, per_cluster=4, bags_per_slide=2, seed=0, stain_views=SPEC)
    sources = {0: 0, 1: 0, 2: 0}
    e0 = entries[0]
    arrays = [np.asarray(e0.features(), np.float32), *[np.asarray(v, np.float32) for v in load_views(e0, SPEC)]]
    for _ in range(60):
        item = with_views[0]
        first = item["image"][:, 0].numpy()  # [S, D] of the bag's first slot (cluster 0 is never empty here)
        hits = [i for i, a in enumerate(arrays) if any(np.array_equal(first, row) for row in a)]
        assert len(hits) == 1, hits
        sources[hits[0]] += 1
    assert all(n >= 8 for n in sources.values()), sources  # each of original and the 2 views, about a third each
    assert torch.equal(plain[0]["label"], with_views[0]["label"])
    missing = StainViews(3)
    with pytest.raises(BundleInputError, match="no stain views") as err:
        BagDataset(entries, num_clusters=2, per_cluster=4, stain_views=missing)
    assert str(views_path(entries[0].path, missing)) == err.value.path


def test_training_config_wires_views_into_extraction_and_training_bags():
    from scripts.workflows.pipeline_config import pipeline_parser

    off = pipeline_parser()
    assert off.get_parsed_content("stain_views_spec") is None
    on = pipeline_parser({"stain_views": 4, "stain_views_sigma": 0.1, "seed": 3})
    assert on.get_parsed_content("stain_views_spec") == StainViews(4, 0.1, 0.05, 3)
    assert on["train"]["dataset"]["stain_views"] == "@stain_views_spec"
    assert "stain_views=@stain_views_spec" in on["features"]


def test_stain_benchmark_rows_pair_each_arm_with_its_base():
    from scripts.benchmarks.stain import summarise, views_of
    from scripts.evaluation.stats import delong_test

    rng = np.random.default_rng(0)
    labels = {f"s{i}": i % 2 for i in range(40)}

    def report(noise: float) -> dict:
        preds = {k: float(np.clip(y * 0.6 + 0.2 + rng.normal(0, noise), 0, 1)) for k, y in labels.items()}
        return {"models": {"dsmil": {"predictions": preds, "combined": {"auc": 0.7}, "mean": {"auc": 0.7},
                                     "ci95": {"auc": {"low": 0.6, "high": 0.8}}}}}

    arms = {"none": {0: report(0.5)}, "none+views": {0: report(0.3)}, "macenko": {0: report(0.2)}, "macenko+views": {0: report(0.1)}}
    rows, ratios = summarise(arms, labels)
    by = {(r["stain_normalization"], r["stain_views"]): r for r in rows}
    assert views_of("macenko+views") == 4 and views_of("macenko+views", 2) == 2 and views_of("reinhard") == 0
    assert set(by) == {("none", 0), ("none", 4), ("macenko", 0), ("macenko", 4)} and by[("none", 0)]["p_vs_base"] == ""

    def p(a: str, b: str) -> str:
        pa, pb = arms[a][0]["models"]["dsmil"]["predictions"], arms[b][0]["models"]["dsmil"]["predictions"]
        ids = sorted(labels)
        return f"{delong_test([labels[i] for i in ids], [pa[i] for i in ids], [pb[i] for i in ids])['p']:.3f}"

    assert by[("macenko", 4)]["p_vs_base"] == p("macenko", "macenko+views")  # views against the same normalisation
    assert by[("none", 4)]["p_vs_base"] == p("none", "none+views") and by[("macenko", 0)]["p_vs_base"] == p("none", "macenko")
    assert ratios["macenko+views_vs_none_mean"] == 1.0
