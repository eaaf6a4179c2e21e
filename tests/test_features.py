"""SimSiam pretraining and the resumable, provenance-keyed feature store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityRanged

from scripts.data.manifest import read_manifest
from scripts.features.encoders import build_encoder, build_scale_encoders, encoder_signature
from scripts.features.extraction import extract_cohort
from scripts.features.simsiam import SimSiam, collapse_std, pretrain_scales, read_history, simsiam_loss
from scripts.workflows.stages import prepare_cohort
from scripts.wsi.tiling import TilingParams

SCALES = (0.5, 1.0, 2.0)
KEYS = ["scale_0", "scale_1", "scale_2"]


def _chain():
    from scripts.wsi.transforms import LoadMultiScaleRegiond

    return Compose([LoadMultiScaleRegiond(KEYS, SCALES, 256), Resized(KEYS, (256, 256), mode="area"),
                    ScaleIntensityRanged(KEYS, 0, 255, 0.0, 1.0), EnsureTyped(KEYS, dtype=torch.float32, track_meta=False)])


def _chain_text(exc: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps transform errors)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


class FailOnSlide:
    """Fault injection: raise while reading any patch of one slide (as a corrupt file would)."""

    def __init__(self, inner, slide_index: int) -> None:
        self.inner, self.slide_index = inner, slide_index

    def __call__(self, item):
        if item["slide_index"] == self.slide_index:
            raise RuntimeError("injected read failure")
        return self.inner(item)


@pytest.fixture(scope="module")
def cohort(tiny_demo, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    records = read_manifest(tiny_demo)
    up = prepare_cohort(records, cache, TilingParams(scales_mpp=SCALES, max_patches=24, seed=0), progress=False)
    return records, up["tiles"], cache


def _extract(cohort, store, transform=None, seed=0, stats=None):
    records, tiles, _ = cohort
    encoders = build_scale_encoders("tiny", 3, seed=seed)
    return extract_cohort(records, tiles, store, encoders, "tiny", transform or _chain(), KEYS, {"v": 1},
                          batch_size=16, progress=False, stats=stats)


def test_crash_mid_extraction_leaves_no_partial_entry_and_rerun_resumes(cohort, tmp_path):
    store = tmp_path / "features"
    with pytest.raises(RuntimeError) as err:
        _extract(cohort, store, transform=FailOnSlide(_chain(), slide_index=2))
    assert "injected" in _chain_text(err.value)
    finished = sorted(p.name for p in store.iterdir())
    assert len(finished) == 2  # slides 0 and 1 were complete before the failure
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp-")]
    assert all((store / f / "meta.json").is_file() and (store / f / "features.npy").is_file() for f in finished)
    stats: dict = {}
    entries = _extract(cohort, store, stats=stats)
    records = cohort[0]
    assert stats["computed"] == [records[2].slide_id, records[3].slide_id]  # finished slides are not recomputed
    assert len(entries) == 4 and all(e.path.is_dir() for e in entries)
    stats2: dict = {}
    _extract(cohort, store, stats=stats2)
    assert stats2["computed"] == []


def test_features_identical_across_runs_with_same_seed(cohort, tmp_path):
    a = _extract(cohort, tmp_path / "a")
    b = _extract(cohort, tmp_path / "b")
    for ea, eb in zip(a, b):
        assert ea.path.name == eb.path.name
        assert np.array_equal(ea.features(), eb.features())
    c = _extract(cohort, tmp_path / "c", seed=1)
    assert not np.array_equal(a[0].features(), c[0].features())


def _pretrain_transform(scale: float):
    from scripts.workflows.pipeline_config import pipeline_parser

    return pipeline_parser().get_parsed_content("pretrain_transform")(scale)


def test_simsiam_loss_falls_and_does_not_collapse(cohort):
    records, tiles, _ = cohort
    transform = _pretrain_transform(2.0)
    coords = np.load(tiles[1] / "coords.npy")[:16]
    items = [transform({"path": records[1].path, "centre": c.astype(np.float32), "mpp": float("nan")}) for c in coords]
    x1 = torch.stack([torch.as_tensor(i["view1"]) for i in items])
    x2 = torch.stack([torch.as_tensor(i["view2"]) for i in items])
    assert x1.shape == (16, 3, 256, 256) and not torch.equal(x1, x2)  # two different augmented views
    torch.manual_seed(0)
    model = SimSiam("tiny", dim=256, pred_dim=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    losses, stds = [], []
    for _ in range(16):  # 8 steps sat at the threshold (loss -0.013 -> -0.059); 16 give ~ -0.2
        p1, p2, z1, z2 = model(x1, x2)
        loss = simsiam_loss(p1, p2, z1, z2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        stds.append(collapse_std(z1))
    assert losses[-1] < losses[0] - 0.05
    assert min(stds) > 0.5 / math.sqrt(256)  # healthy outputs spread ~1/sqrt(d); collapse -> 0


def test_simsiam_loss_values():
    z = torch.randn(4, 8)
    assert float(simsiam_loss(z, z, z, z)) == pytest.approx(-1.0)
    assert float(simsiam_loss(z, z, -z, -z)) == pytest.approx(1.0)
    assert collapse_std(torch.ones(16, 8)) == pytest.approx(0.0, abs=1e-6)


class FailInEpoch:
    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0

    def __call__(self, item):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("injected crash in epoch 2")
        return self.inner(item)


def test_pretraining_resumes_and_feeds_extraction(cohort, tmp_path, caplog):
    records, tiles, _ = cohort
    kw = dict(scales_mpp=SCALES, pretrain_scales_mpp=[2.0], arch="tiny", epochs=2, batch_size=8,
              max_patches_per_slide=4, seed=0, progress=False)
    n_items = 16  # 4 slides x 4 patches: one epoch reads 16 items
    with pytest.raises(RuntimeError) as err:
        pretrain_scales(records, tiles, tmp_path, lambda s: FailInEpoch(_pretrain_transform(s), n_items + 3), **kw)
    assert "injected" in _chain_text(err.value)
    assert not list(tmp_path.glob("*/encoder.pt"))
    assert list(tmp_path.glob("*/checkpoints/resume_*.pt"))  # epoch 1 was checkpointed
    import logging

    with caplog.at_level(logging.INFO, logger="scripts.features.simsiam"):
        weights = pretrain_scales(records, tiles, tmp_path, _pretrain_transform, **kw)
    assert "resuming after epoch 1" in caplog.text
    assert weights[:2] == [None, None] and weights[2].endswith("encoder.pt")
    history = read_history(weights[2])
    assert [h["epoch"] for h in history] == [2]  # only the unfinished epoch ran again
    assert list((tmp_path).glob("*/logs/events.out.tfevents.*"))
    enc = build_encoder("tiny", weights[2])
    assert encoder_signature(enc, "tiny") != encoder_signature(build_encoder("tiny", seed=2000), "tiny")
    # cached: a second call returns at once with the same file
    assert pretrain_scales(records, tiles, tmp_path, _pretrain_transform, **kw) == weights


def test_mismatched_encoder_weights_are_explained(tmp_path):
    from scripts.errors import BundleInputError

    path = tmp_path / "w.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(BundleInputError, match="do not match the ResNet network") as err:
        build_encoder("tiny", path)
    assert "conv1.weight (1,) vs (16, 3, 7, 7)" in str(err.value) and "encoder_arch" in err.value.fix


class WholeChain:
    """The patch chain run whole in the loader (float32 patches, as before 0.13): not a Compose, so extraction
    cannot move its intensity transforms to the device."""

    def __init__(self, chain) -> None:
        self.chain = chain

    def __call__(self, item):
        return self.chain(item)


def _config_chain():
    from scripts.workflows.pipeline_config import pipeline_parser

    return pipeline_parser().get_parsed_content("preprocessing")


def test_uint8_loader_and_device_preprocessing_give_the_features_of_the_float_path(cohort, tmp_path):
    """Workers that own whole cells and hand over uint8 patches, intensity transforms on the device: the same
    store, bit for bit, as the whole float chain in the loader, with 0 and 2 workers and batches that span slides."""
    records, tiles, _ = cohort
    ref = extract_cohort(records, tiles, tmp_path / "ref", build_scale_encoders("tiny", 3), "tiny", WholeChain(_config_chain()), KEYS,
                         {"v": 1}, batch_size=16, progress=False)
    for workers in (0, 2):
        new = extract_cohort(records, tiles, tmp_path / f"w{workers}", build_scale_encoders("tiny", 3), "tiny", _config_chain(), KEYS,
                             {"v": 1}, batch_size=16, num_workers=workers, progress=False)
        for a, b in zip(ref, new):
            assert a.path.name == b.path.name  # same provenance: the store does not depend on where the arithmetic runs
            assert a.features().tobytes() == b.features().tobytes(), (workers, a.path.name)
            assert np.array_equal(a.coords(), b.coords())


def test_patch_chain_splits_into_uint8_reader_and_a_device_module():
    from monai.transforms import GaussianSmoothd

    from scripts.features.device_preprocessing import PatchNormalize, PreprocessedEncoder, split_transform
    from scripts.wsi.transforms import LoadMultiScaleRegiond

    chain = _config_chain()
    worker, module = split_transform(chain)
    assert [type(t) for t in worker.transforms] == [LoadMultiScaleRegiond] and isinstance(module, PatchNormalize)
    x = np.random.default_rng(0).integers(0, 256, (3, 256, 256), dtype=np.uint8)
    item = {k: x for k in KEYS}
    for t in chain.transforms[1:]:
        item = t(item)
    assert torch.equal(module(torch.as_tensor(x)[None])[0], torch.as_tensor(item["scale_0"]))  # MONAI's arithmetic, bit for bit
    assert split_transform(WholeChain(chain))[1] is None
    odd = Compose([*chain.transforms, GaussianSmoothd(KEYS, 1.0)])  # a transform with no device form: stays in the loader
    assert split_transform(odd) == (odd, None)
    enc = PreprocessedEncoder(module, build_encoder("tiny")).eval()
    scripted = torch.jit.script(enc)
    u = torch.as_tensor(x)[None]
    assert scripted.includes_preprocessing and torch.equal(scripted(u), enc(u))
    assert encoder_signature(scripted, "tiny") == encoder_signature(build_encoder("tiny"), "tiny")  # hash of the backbone


def test_workers_own_contiguous_runs_of_whole_cells():
    from scripts.features.patch_loader import CellDealtPatches, cell_runs

    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 4000, (300, 2))
    cells = np.floor(centres / 1000).astype(int)
    order = np.lexsort((centres[:, 0], centres[:, 1], cells[:, 0], cells[:, 1]))  # cell by cell, as tiling orders them
    coords = centres[order]
    runs = cell_runs(coords, 1000.0)
    assert runs[0] == 0 and runs[-1] == 300 and len(runs) - 1 == len({tuple(c) for c in cells})
    slide = {"path": "x", "mpp": 0.5, "coords": coords, "cell_px": 1000.0}
    ds = CellDealtPatches([slide] * 4, lambda d: d, [], 8)
    assert ds.blocks(0, 2) == [(0, 0, 300), (2, 0, 300)] and ds.blocks(1, 2) == [(1, 0, 300), (3, 0, 300)]  # whole slides balance
    for slides, workers in [(1, 2), (1, 3), (3, 2), (2, 3), (4, 2)]:
        ds = CellDealtPatches([slide] * slides, lambda d: d, [], 8)
        blocks = [b for w in range(workers) for b in ds.blocks(w, workers)]
        loads = [sum(b - a for _, a, b in ds.blocks(w, workers)) for w in range(workers)]
        assert max(loads) <= 1.15 * 300 * slides / workers + max(np.diff(runs)), (slides, workers, loads)  # balanced to a cell
        for si in range(slides):
            spans = sorted((a, b) for s, a, b in blocks if s == si)
            assert spans[0][0] == 0 and spans[-1][1] == 300 and all(p[1] == q[0] for p, q in zip(spans, spans[1:]))  # a partition
            assert all(a in set(runs.tolist()) for a, _ in spans)  # cut at cell boundaries only
