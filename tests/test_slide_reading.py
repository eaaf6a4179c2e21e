"""mpp-driven level choice, resampling and co-centring on generated pyramids and real Aperio slides."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.errors import BundleInputError
from scripts.wsi.pyramid import area_downsample
from scripts.wsi.slide import SlideReader
from scripts.wsi.tiling import TilingParams, alignment, prepare_slide

SCALES = (0.5, 1.0, 2.0)


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_plan_picks_largest_level_not_above_target(pyramid_1_4_16, backend):
    with SlideReader(pyramid_1_4_16, backend=backend) as s:
        assert s.mpp == pytest.approx(0.5)
        assert s.downsamples == pytest.approx([1.0, 4.0, 16.0])
        p20, p10, p5 = (s.plan(m, 256) for m in SCALES)
        assert (p20.level, p20.region, p20.resample) == (0, 256, False)
        # no 1 µm/px level: read 512 px at level 0 and downsample by 2
        assert (p10.level, p10.region, p10.resample) == (0, 512, True)
        assert (p5.level, p5.region, p5.resample) == (1, 256, False)
        p8 = s.plan(8.0, 256)
        assert (p8.level, p8.region) == (2, 256)


def test_missing_level_gives_exact_10x_patch(pyramid_1_4_16, textured_image):
    """10x from a 1x/4x/16x pyramid equals the 2x area-downsample of the level-0 pixels around the centre."""
    centre = (1024, 800)
    with SlideReader(pyramid_1_4_16) as s:
        patch = s.read_patch(centre, s.plan(1.0, 256))
    x0, y0 = centre[0] - 256, centre[1] - 256
    expected = area_downsample(textured_image[y0 : y0 + 512, x0 : x0 + 512], 2)
    assert patch.shape == (256, 256, 3)
    assert np.abs(patch.astype(int) - expected.astype(int)).max() <= 1


def test_level_and_resampled_paths_agree(pyramid_1_4_16, pyramid_1_2_4):
    """The same 10x patch read from a real 2x level and resampled from level 0 match."""
    centre = (1000, 1200)
    with SlideReader(pyramid_1_4_16) as a, SlideReader(pyramid_1_2_4) as b:
        pa = a.read_patch(centre, a.plan(1.0, 256))
        pb = b.read_patch(centre, b.plan(1.0, 256))
    assert np.abs(pa.astype(int) - pb.astype(int)).max() <= 1


@pytest.mark.parametrize("fixture", ["pyramid_1_4_16", "pyramid_1_2_4"])
def test_patch_centres_of_all_scales_agree(request, fixture):
    """Co-centring: on grid centres every scale's region has the same level-0 centre (< 1 px)."""
    path = request.getfixturevalue(fixture)
    with SlideReader(path) as s:
        plans = [s.plan(m, 256) for m in SCALES]
        align = alignment(s, SCALES, 256)
        rng = np.random.default_rng(0)
        for _ in range(50):
            c = tuple(int(v) for v in rng.integers(1, 2048 // align, size=2) * align)
            centres = np.array([s.region_centre(c, p) for p in plans])
            assert np.abs(centres - np.array(c)).max() < 1.0


def test_real_svs_tiled_and_read_at_three_scales(cmu_svs, tmp_path):
    params = TilingParams(scales_mpp=SCALES, patch_size=256)
    entry = prepare_slide("cmu", cmu_svs, tmp_path, params)
    coords = np.load(entry / "coords.npy")
    assert len(coords) > 10
    with SlideReader(cmu_svs) as s:
        assert s.mpp == pytest.approx(0.499)
        plans = [s.plan(m, 256) for m in SCALES]
        # single-level slide: 20x snaps to level 0, 10x and 5x are exact 2x / 4x block averages of it
        # (0.499 µm/px: factors 2.004 / 4.008 snap to integers within the 5% tolerance)
        assert [p.region for p in plans] == [256, 512, 1024]
        for c in coords[:5]:
            patches = [s.read_patch(tuple(c), p) for p in plans]
            assert all(p.shape == (256, 256, 3) for p in patches)
            centres = np.array([s.region_centre(tuple(c), p) for p in plans])
            assert np.abs(centres - c).max() < 1.0
        # patches are tissue, not background
        assert patches[0].mean() < 230
    assert (entry / "tissue.png").is_file()


def test_slide_without_mpp_needs_override(tcga_svs):
    with pytest.raises(BundleInputError, match="no microns-per-pixel") as err:
        SlideReader(tcga_svs)
    assert str(tcga_svs) in str(err.value) and "mpp" in err.value.fix
    with SlideReader(tcga_svs, mpp=0.25) as s:
        assert s.mpp_source == "override"
        p5 = s.plan(2.0, 256)  # 2x level has 0.5 µm/px: read 1024 px there
        assert (p5.level, p5.region) == (1, 1024)


def test_scale_finer_than_native_is_refused(cmu_svs):
    with SlideReader(cmu_svs) as s, pytest.raises(BundleInputError, match="finer than the slide's native"):
        s.plan(0.25, 256)


def test_non_slide_file_is_refused(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    with pytest.raises(BundleInputError, match="cannot be opened"):
        SlideReader(bad)


@pytest.mark.parametrize("fixture", ["pyramid_1_4_16", "cmu_svs"])
def test_grouped_reader_returns_the_same_pixels(request, fixture, tmp_path):
    """Grouped (chunk-cached) reads give exactly the pixels of one read per patch, at every scale, edges
    included, also when the cache is too small to hold a cell's chunks."""
    path = request.getfixturevalue(fixture)
    params = TilingParams(scales_mpp=SCALES, patch_size=256, min_tissue=0.0, read_cell_um=300.0)
    coords = np.load(prepare_slide("s", path, tmp_path, params) / "coords.npy")
    from scripts.wsi.slide import CHUNK_CACHE, READ_CACHE_MB

    with SlideReader(path) as direct, SlideReader(path, read_cell_um=300.0) as grouped:
        plans = [grouped.plan(m, 256) for m in SCALES]
        assert [direct.plan(m, 256) for m in SCALES] == plans
        for c in coords:
            for p in plans:
                assert np.array_equal(grouped.read_region(tuple(c), p), direct.read_region(tuple(c), p))
                patch = grouped.read_patch(tuple(c), p)
                assert np.array_equal(patch, direct.read_patch(tuple(c), p))
        # decoded chunks of every level read, plus reduced chunks of every resampled scale
        levels = {p.level for p in plans}
        reduced = {(p.level, p.region // p.out_size) for p in plans if p.resample}
        assert {k[:2] for k in grouped.cached_chunks()} == {(lv, 1) for lv in levels} | reduced
        with pytest.raises(ValueError):  # patches may be views of shared chunks: read-only
            grouped.read_patch(tuple(coords[0]), plans[0])[0, 0, 0] = 1
    assert not grouped.cached_chunks()  # closing a slide frees its chunks
    try:  # a cache too small for one cell still gives the same pixels and stays within its budget
        with SlideReader(path) as direct, SlideReader(path, read_cell_um=300.0, read_cache_mb=1) as tight:
            for c in coords:
                for p in plans:
                    assert np.array_equal(tight.read_patch(tuple(c), p), direct.read_patch(tuple(c), p))
                    assert CHUNK_CACHE.nbytes <= 2**20 or len(tight.cached_chunks()) == 1
    finally:
        CHUNK_CACHE.budget = READ_CACHE_MB * 2**20


def test_centres_are_ordered_cell_by_cell(pyramid_1_2_4, tmp_path):
    params = TilingParams(scales_mpp=SCALES, min_tissue=0.0, read_cell_um=256.0)
    coords = np.load(prepare_slide("s", pyramid_1_2_4, tmp_path, params) / "coords.npy")
    cells = [(int(y // 512), int(x // 512)) for x, y in coords]
    assert cells == sorted(cells)  # each cell's centres are consecutive, cells row-major


@pytest.mark.parametrize("fixture", ["pyramid_1_4_16", "cmu_svs"])
def test_fast_reader_matches_the_reference_approach(request, fixture, tmp_path):
    """The grouped reader (levels chosen by mpp, chunk cache) against the reference approach of the public
    CS-MIL code (three level-0 reads of 256/512/1024 px, area-resized): same pixels up to the resampling of
    the pyramid's own lower levels (exact where every scale comes from level 0)."""
    import openslide

    from scripts.benchmarks.read import reference_patches

    path = request.getfixturevalue(fixture)
    params = TilingParams(scales_mpp=SCALES, patch_size=256, min_tissue=0.0)
    coords = np.load(prepare_slide("s", path, tmp_path, params) / "coords.npy")
    ref_slide = openslide.OpenSlide(str(path))
    with SlideReader(path, read_cell_um=params.read_cell_um) as fast:
        # centres whose largest region lies inside the slide (outside it the reference gets transparent
        # black from OpenSlide, we pad white)
        h0, w0 = fast.size
        half = 256 * max(SCALES) / fast.mpp / 2 + 2
        inside = (coords[:, 0] >= half) & (coords[:, 0] <= w0 - half) & (coords[:, 1] >= half) & (coords[:, 1] <= h0 - half)
        coords = coords[inside]
        assert len(coords) >= 4
        plans = [fast.plan(m, 256) for m in SCALES]
        for x, y in coords:
            for p, want in zip(plans, reference_patches(ref_slide, x, y, fast.mpp)):
                got = fast.read_patch((x, y), p)
                diff = np.abs(got.astype(int) - want.astype(int))
                # identical where both read level 0; where we read a lower pyramid level, they differ by that
                # level's own area-downsampling and rounding when the file was written
                if p.level == 0:
                    assert diff.max() == 0, (p, x, y)
                else:
                    assert diff.max() <= 2 and diff.mean() < 0.5, (p, x, y, diff.max(), diff.mean())
    ref_slide.close()


def test_an_override_replaces_implausible_metadata(tmp_path, textured_image):
    """A header claiming 0.01 µm/px: refused alone (the error suggests the manifest's mpp), read at the override
    when one is given, without --mpp_force; an implausible override is refused whatever the metadata."""
    from scripts.wsi.pyramid import write_pyramid

    path = write_pyramid(tmp_path / "s.tif", textured_image[:512, :512], mpp=0.01, downsamples=(1, 2), compression="deflate")
    with pytest.raises(BundleInputError, match="metadata says 0.01 µm/px, outside the plausible range"):
        SlideReader(path)
    with SlideReader(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "override (implausible metadata: 0.01)"
    with pytest.raises(BundleInputError, match=r"the mpp override 0 µm/px .* is outside the plausible range"):
        SlideReader(path, mpp=0.0, mpp_force=True)


def test_a_picture_can_be_converted_to_a_slide_as_the_error_says(tmp_path):
    from PIL import Image

    from scripts.wsi.convert import main, picture_format

    yy, xx = np.mgrid[0:700, 0:900]
    img = np.stack([60 + xx * 0.15, 80 + yy * 0.2, 150 + 0 * xx], axis=-1).astype(np.uint8)  # smooth: JPEG tiles keep it
    Image.fromarray(img).save(tmp_path / "photo.png")
    assert picture_format(tmp_path / "photo.png") == "PNG"
    with pytest.raises(BundleInputError, match="is a PNG picture, not a whole-slide image"):
        SlideReader(tmp_path / "photo.png")
    assert main([str(tmp_path / "photo.png"), str(tmp_path / "photo.tif"), "--mpp", "0.5"]) == 0
    with SlideReader(tmp_path / "photo.tif") as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.size == (700, 900) and slide.level_count == 2
        box = slide.read_level_box(0, 100, 200, 64, 64)[..., :3].astype(int)
        assert np.abs(box - img[200:264, 100:164]).mean() < 3
