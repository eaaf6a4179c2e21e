"""DICOM-WSI slides (scripts/wsi/formats.py): a series built here from a generated pyramid (wsidicomizer, JPEG 2000
lossless, so pixels are comparable) reads through OpenSlide exactly as its source does, as a folder or through any
of its files, in manifests and inference inputs, and runs inference."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from scripts.errors import BundleInputError
from scripts.wsi.formats import dicom_folder, reader_path, slide_fingerprint
from scripts.wsi.pyramid import write_pyramid
from scripts.wsi.slide import SlideReader


def to_dicom(source: Path, folder: Path) -> Path:
    """``source`` (a pyramidal TIFF) as a DICOM-WSI series in ``folder``: one file per level, JPEG 2000 lossless."""
    wsidicomizer = pytest.importorskip("wsidicomizer")
    from wsidicom.codec import Jpeg2kSettings

    wsidicomizer.WsiDicomizer.convert(str(source), str(folder), tile_size=256, include_label=False, include_overview=False,
                                      include_thumbnail=False, encoding=Jpeg2kSettings(levels=[0]))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dicom")
    yy, xx = np.mgrid[0:2048, 0:2048]
    img = np.stack([128 + 60 * np.sin(xx / 37.0), 128 + 60 * np.cos(yy / 23.0), 128 + 40 * np.sin((xx + yy) / 51.0)], -1).astype(np.uint8)
    src = write_pyramid(tmp / "slide.tif", img, mpp=0.5, downsamples=(1, 2, 4), compression="deflate")
    return src, to_dicom(src, tmp / "slide-dcm")


def test_a_dicom_series_reads_as_its_source(pair):
    src, folder = pair
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 3  # one instance per level
    assert dicom_folder(folder) == folder == dicom_folder(files[-1]) and dicom_folder(src) is None
    assert Path(reader_path(folder)).stat().st_size == max(f.stat().st_size for f in files)  # level 0 opened
    with SlideReader(src) as a, SlideReader(folder) as b, SlideReader(files[0]) as c:
        assert a.level_dims == b.level_dims == c.level_dims == [(2048, 2048), (1024, 1024), (512, 512)]
        assert a.mpp == b.mpp == c.mpp == 0.5
        for mpp in (0.5, 1.0, 2.0, 1.5):  # pyramid levels and a resampled scale
            pa, pb = a.plan(mpp, 256), b.plan(mpp, 256)
            assert pa == pb
            np.testing.assert_array_equal(a.read_patch((1000.0, 900.0), pa), b.read_patch((1000.0, 900.0), pb))
    fp = slide_fingerprint(folder)
    assert fp["format"] == "dicom" and len(fp["files"]) == 3 and slide_fingerprint(files[1]) == fp


def test_dicom_in_manifests_backends_and_inputs(pair, tmp_path):
    from scripts.data.manifest import read_manifest
    from scripts.inference.inputs import input_records

    src, folder = pair
    one_file = sorted(folder.glob("*.dcm"))[0]
    m = tmp_path / "manifest.csv"
    m.write_text(f"slide_id,patient_id,path,label\na,p1,{folder},1\nb,p2,{src},0\n")
    records = read_manifest(m)
    assert Path(records[0].path) == folder
    m.write_text(f"slide_id,patient_id,path,label\na,p1,{folder},1\nb,p2,{one_file},0\n")  # the same series twice
    with pytest.raises(BundleInputError, match="already listed at row"):
        read_manifest(m)
    with pytest.raises(BundleInputError, match="--wsi_backend openslide"):
        SlideReader(folder, backend="tifffile")
    assert [(r.slide_id, Path(r.path)) for r in input_records(one_file)] == [("slide-dcm", folder)]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copytree(folder, inputs / "case-7")
    shutil.copy(src, inputs / "case-8.tif")
    assert [r.slide_id for r in input_records(inputs)] == ["case-7", "case-8"]  # a series folder is one slide


@pytest.mark.slow
def test_inference_on_a_dicom_slide(tiny_demo, tmp_path):
    """Acceptance: a DICOM-WSI slide runs inference; its prediction equals that of the slide it was made from."""
    from conftest import run_bundle

    data = dict(dataset_dir=str(tiny_demo.parent), ckpt_dir=str(tmp_path / "models"))
    run_bundle("train.yaml", max_epochs=1, val_fraction=0.5, output_dir=str(tmp_path / "train"), **data)
    src = tiny_demo.parent / "slides" / "demo-p001-s0.tif"
    folder = to_dicom(src, tmp_path / "demo-p001-s0-dcm")
    probs = {}
    for name, given in (("tif", src), ("dcm", folder)):
        out = tmp_path / name
        run_bundle("inference.yaml", input=str(given), num_bags=3, output_dir=str(out), **data)
        rows = list(csv.DictReader(open(out / "predictions.csv")))
        assert len(rows) == 1
        probs[name] = float(rows[0]["probability"])
        assert (out / rows[0]["slide_id"] / "attention_20x.png").is_file()
    assert rows[0]["slide_id"] == "demo-p001-s0-dcm"
    assert abs(probs["tif"] - probs["dcm"]) < 1e-5, probs
