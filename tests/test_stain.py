"""Stain normalisation and augmentation (scripts/features/stain.py): Macenko equals MONAI's NormalizeHEStains on real
H&E tiles, Reinhard matches the target's statistics, both run batched on the device as the encoders' first layer,
are part of the feature store's hash and the contract, and are the same TorchScript code in extraction and the
Deploy export (bit for bit); the demo's stain sites; HED jitter for SimSiam."""

from __future__ import annotations

import io

import numpy as np
import openslide
import pytest
import torch

from scripts.errors import BundleInputError
from scripts.features.stain import (MacenkoNormalize, RandHEStainJitterd, ReinhardNormalize, _srgb_to_lab, build_stain, fit_target,
                                    stain_settings)


@pytest.fixture(scope="module")
def he_tiles(cmu_svs) -> np.ndarray:
    """256 px tiles of the real Aperio slide that hold tissue (N, 256, 256, 3) uint8."""
    s = openslide.OpenSlide(str(cmu_svs))
    img = np.array(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    tiles = []
    for y in range(0, img.shape[0] - 256, 256):
        for x in range(0, img.shape[1] - 256, 256):
            t = img[y:y + 256, x:x + 256]
            od = -np.log(np.clip(t.reshape(-1, 3).astype(np.float32) + 1, None, 240) / 240)
            if np.all(od > 0.15, axis=1).mean() > 0.3:
                tiles.append(t)
    return np.stack(tiles[:12])


def test_macenko_equals_monai_on_real_tiles(he_tiles):
    from monai.apps.pathology.transforms.stain.array import NormalizeHEStains

    monai_norm = NormalizeHEStains()
    x = torch.as_tensor(he_tiles).permute(0, 3, 1, 2)
    ours = MacenkoNormalize()(x).permute(0, 2, 3, 1).numpy()
    assert ours.dtype == np.float32 and ours.min() >= 0 and ours.max() <= 255 and np.array_equal(ours, np.floor(ours))
    for tile, got in zip(he_tiles, ours):
        want = monai_norm(tile.copy()).astype(np.int64)
        diff = np.abs(want - got.astype(np.int64))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding at the integer steps only
    alone = MacenkoNormalize()(x[3:4])
    assert torch.equal(alone[0], torch.as_tensor(ours[3]).permute(2, 0, 1))  # a patch's result does not depend on its batch
    white = torch.full((1, 3, 64, 64), 250, dtype=torch.uint8)
    assert torch.equal(MacenkoNormalize()(white), white.float())  # background passes unchanged (MONAI raises)


def test_reinhard_matches_the_targets_statistics(he_tiles):
    x = torch.as_tensor(he_tiles).permute(0, 3, 1, 2)
    target = {"target_mean": [60.0, 20.0, -10.0], "target_std": [15.0, 8.0, 6.0]}
    out = ReinhardNormalize(**target)(x)
    lab = _srgb_to_lab(out.reshape(len(x), 3, -1) / 255.0)
    for i in range(len(x)):
        tissue = lab[i][:, lab[i][0] < 88.0]
        assert np.allclose(tissue.mean(dim=1).numpy(), target["target_mean"], atol=3.0)
    before = _srgb_to_lab(x.float().reshape(len(x), 3, -1) / 255.0)
    assert torch.allclose(_srgb_to_lab(torch.tensor([[[0.2], [0.5], [0.7]]])), _srgb_to_lab(torch.tensor([[[0.2], [0.5], [0.7]]])))
    assert not torch.allclose(lab, before, atol=1.0)  # it changed the colours
    white = torch.full((1, 3, 32, 32), 250, dtype=torch.uint8)
    assert torch.allclose(ReinhardNormalize()(white), white.float(), atol=0.05)  # no tissue: the colour round trip only


def test_targets_from_an_image_and_standard_references(he_tiles, cmu_svs):
    fitted = fit_target("macenko", he_tiles[0])
    assert np.asarray(fitted["target_he"]).shape == (3, 2) and len(fitted["max_cref"]) == 2
    m = build_stain("macenko", **fitted)
    assert np.allclose(stain_settings(m)["target_he"], fitted["target_he"])
    assert stain_settings(torch.jit.script(m)) == stain_settings(m)  # settings readable from the exported module
    assert build_stain(None) is None and build_stain("none") is None
    s = openslide.OpenSlide(str(cmu_svs))  # the standard Reinhard target is that of the real Aperio slide's level 0
    reference = fit_target("reinhard", np.array(s.read_region((0, 0), 0, s.dimensions).convert("RGB")))
    assert stain_settings(build_stain("reinhard"))["target_mean"] == pytest.approx(reference["target_mean"], abs=1e-3)
    assert stain_settings(build_stain("reinhard"))["target_std"] == pytest.approx(reference["target_std"], abs=1e-3)
    with pytest.raises(BundleInputError, match="unknown stain_normalization 'vahadane'"):
        build_stain("vahadane")


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_runs_first_on_the_device_and_is_the_same_code_in_the_export(method):
    from scripts.features.device_preprocessing import attach, split_transform
    from scripts.features.encoders import build_scale_encoders
    from scripts.features.extraction import transform_signature
    from scripts.features.preprocessing import patch_preprocessing

    chain = patch_preprocessing([0.5, 1.0, 2.0], 256, stain=method)
    workers, device = split_transform(chain)
    assert [type(t).__name__ for t in workers.transforms] == ["LoadMultiScaleRegiond"]  # the workers hand over uint8
    assert transform_signature(chain) != transform_signature(patch_preprocessing([0.5, 1.0, 2.0], 256))  # a new store entry
    for arch, weights in (("tiny", None), ("vit-test", "random")):  # a built-in and a named encoder (its own input layer)
        encoders = attach(build_scale_encoders(arch, 3, weights), device)
        assert {e.stain_method for e in encoders} == {method}
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(encoders[0]), buf)  # as the Deploy export writes it
        buf.seek(0)
        exported = torch.jit.load(buf)
        assert exported.stain_method == method
        x = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            plain = encoders[0].stain(x)
            assert torch.equal(exported.stain(x), plain)  # bit for bit
            torch.testing.assert_close(exported(x), encoders[0](x), rtol=1e-5, atol=1e-5)
        assert attach([exported], device)[0] is exported  # the Deploy app: already carries it
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # extraction's autocast (bf16 on CUDA)
            assert torch.equal(exported.stain(x), plain)  # computed in float64, which autocast leaves alone
    with pytest.raises(BundleInputError, match="carries stain normalisation"):
        other = split_transform(patch_preprocessing([0.5], 256, stain="reinhard" if method == "macenko" else "macenko"))[1]
        attach([exported], other)


def test_demo_sites_differ_in_stain_not_in_label():
    from scripts.data.demo import DemoParams, render_slide, site_of, site_stain

    p = DemoParams(size=512, stain_sites=3, stain_strength=0.4)
    assert [site_of(i, p) for i in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]  # both classes (p % 2) at every site
    assert site_of(0, DemoParams()) is None and "stain_sites" not in DemoParams().to_dict()  # old cohorts keep their key
    img, _, _ = render_slide(1, p, np.random.default_rng(0))
    stained = [site_stain(img, s, p) for s in range(3)]
    assert all(np.abs(a.astype(int) - img).mean() > 2 for a in stained)
    assert np.array_equal(stained[1], site_stain(img, 1, p))  # fixed per site
    assert np.abs(stained[0].astype(int) - stained[1]).mean() > 2


def test_hed_jitter_for_simsiam():
    img = torch.rand(3, 32, 32) * 0.6 + 0.2
    t = RandHEStainJitterd(keys="view1", sigma=0.2, bias=0.05, prob=1.0)
    t.set_random_state(seed=0)
    a = t({"view1": img})["view1"]
    t.set_random_state(seed=0)
    assert torch.equal(a, t({"view1": img})["view1"])  # seeded
    assert a.shape == img.shape and a.dtype == img.dtype and 0 <= float(a.min()) and float(a.max()) <= 1
    assert (a - img).abs().mean() > 0.005
    off = RandHEStainJitterd(keys="view1", prob=0.0)
    assert torch.equal(off({"view1": img})["view1"], img)


# The pipeline with stain normalisation (training records it, inference and export take it from the checkpoint and
# refuse another, the Deploy encoders carry the same code): tests/test_foundation_encoders.py, one run for both.
