"""A full disk is one line naming the folder and what was being written; cache entries and slide output folders
are complete or absent, and predictions.csv lists exactly the slide folders that exist. On a real small
filesystem (tmpfs; CI runs as root) and by injecting ENOSPC where the size of a write is hard to aim at."""

from __future__ import annotations

import csv
import errno
import json
import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Events

from scripts.errors import DiskFullError, find_input_error
from scripts.wsi.pyramid import write_pyramid


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of the given size in KiB, mounted under tmp_path (skipped where mounting is refused)."""
    mounted = []

    def mount(kib: int) -> Path:
        point = tmp_path / f"small{len(mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()[:200]}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".lock"))


def _slide(tmp: Path, size: int = 1024) -> Path:
    img = np.random.default_rng(0).integers(60, 200, (size, size, 3), dtype=np.uint8)
    img[: size // 4] = 240  # some background
    return write_pyramid(tmp / "s.tif", img, mpp=0.5, downsamples=(1, 2, 4), compression="deflate")


def _entry(tmp: Path, slide_id: str):
    """A feature entry double with the fields the map writer reads (as tests/test_inference.py does)."""
    slide = _slide(tmp) if not (tmp / "s.tif").exists() else tmp / "s.tif"
    tiles = tmp / "tiles"
    tiles.mkdir(exist_ok=True)
    (tiles / "meta.json").write_text(json.dumps({"mpp": 0.5, "path": str(slide), "level_dims": [[1024, 1024]],
                                                 "tiling": {"patch_size": 256, "backend": "openslide"}}))
    coords = np.array([[512, 512], [700, 700]])
    return SimpleNamespace(slide_id=slide_id, label=1, meta={"tiles_dir": str(tiles)}, num_patches=2, coords=lambda: coords)


def _pred(slide_id: str):
    from scripts.inference.predict import SlidePrediction

    return SlidePrediction(slide_id, 0.7, np.ones((2, 3), np.float32), np.full((2, 3), 1 / 3, np.float32), 0.0)


def test_tiles_on_a_full_disk_are_one_line_and_leave_nothing(tmp_path, small_fs):
    from scripts.wsi.tiling import TilingParams, prepare_slide

    slide = _slide(tmp_path)
    cache = small_fs(8)  # the tissue mask and thumbnail do not fit
    with pytest.raises(DiskFullError) as err:
        prepare_slide("a", slide, cache, TilingParams(patch_size=128, scales_mpp=(0.5, 1.0)))
    assert err.value.path == str(cache / "tiles") and "the tiles of slide 'a'" in err.value.reason
    assert "No space left on device" in err.value.reason and "--output_dir" in err.value.fix
    assert list((cache / "tiles").iterdir()) == []  # no entry, no temporary


def test_slide_outputs_on_a_full_disk_are_absent_not_torn(tmp_path, small_fs):
    from scripts.inference.outputs import add_slide_outputs

    out = small_fs(16)  # a few KB: the maps (PNG, TIFF) of one slide do not fit
    rows: list[dict] = []
    with pytest.raises(DiskFullError) as err:
        add_slide_outputs(rows, _entry(tmp_path, "a"), _pred("a"), out, [0.5, 1.0, 2.0])
    assert err.value.path == str(out) and "the maps and prediction of slide 'a'" in err.value.reason
    assert rows == [] and list(out.iterdir()) == []  # no half folder, no predictions.csv, no temporary


def test_predictions_list_exactly_the_slide_folders_that_exist(tmp_path, monkeypatch):
    """ENOSPC at the second slide's heatmap, then at the third slide's predictions.csv: the first slide is complete
    and listed; the others have neither a folder nor a row."""
    from scripts.inference import outputs
    from scripts.inference.outputs import add_slide_outputs

    out = tmp_path / "out"
    rows: list[dict] = []
    add_slide_outputs(rows, _entry(tmp_path, "a"), _pred("a"), out, [0.5, 1.0, 2.0])
    real = outputs.export.write_heatmap_tiff

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs.export, "write_heatmap_tiff", full)
    with pytest.raises(DiskFullError, match="slide 'b'"):
        add_slide_outputs(rows, _entry(tmp_path, "b"), _pred("b"), out, [0.5, 1.0, 2.0])
    monkeypatch.setattr(outputs.export, "write_heatmap_tiff", real)
    monkeypatch.setattr(outputs, "_write_csv", lambda path, rows: full(path))
    with pytest.raises(DiskFullError, match="predictions.csv"):
        add_slide_outputs(rows, _entry(tmp_path, "c"), _pred("c"), out, [0.5, 1.0, 2.0])
    listed = [r["slide_id"] for r in csv.DictReader(open(out / "predictions.csv"))]
    assert listed == ["a"] == [r["slide_id"] for r in rows]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a"] and _leftovers(out) == []
    assert len(list((out / "a").iterdir())) == 9  # 3 PNG + composite + GeoJSON + 3 TIFF + prediction.json


def test_a_rerun_replaces_a_slide_folder_whole(tmp_path):
    from scripts.inference.outputs import add_slide_outputs

    out = tmp_path / "out"
    add_slide_outputs([], _entry(tmp_path, "a"), _pred("a"), out, [0.5, 1.0, 2.0])
    (out / "a" / "stale.txt").write_text("from an older run")
    add_slide_outputs([], _entry(tmp_path, "a"), _pred("a"), out, [0.5, 1.0, 2.0])
    assert not (out / "a" / "stale.txt").exists() and (out / "a" / "prediction.json").is_file() and _leftovers(out) == []


def test_a_checkpoint_on_a_full_disk_is_one_line_without_a_logged_traceback(small_fs, caplog):
    """The training's checkpoint saver (MONAI's CheckpointSaver, atomic): one line naming the folder and file, no
    torn file, and no traceback logged by StatsHandler (OneLineErrors comes first)."""
    from ignite.engine import Engine
    from monai.handlers import StatsHandler

    from scripts.workflows.handlers import AtomicCheckpointSaver as CheckpointSaver, OneLineErrors

    folder = small_fs(64)
    net = torch.nn.Linear(256, 256)  # 257 KB of weights
    engine = Engine(lambda e, b: None)
    OneLineErrors(folder, "the best-model checkpoint (model.pt)").attach(engine)
    StatsHandler(iteration_log=False, epoch_log=False).attach(engine)
    CheckpointSaver(str(folder), {"model": net}, save_interval=1, epoch_level=True).attach(engine)
    caplog.set_level(logging.INFO)
    with pytest.raises(DiskFullError) as err:
        engine.run([0], max_epochs=1)
    assert err.value.path == str(folder) and "'model_epoch=1.pt'" in err.value.reason
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]
    assert [p.name for p in folder.iterdir()] == []  # MONAI's own saver (atomic=False) leaves a torn file here


def test_a_full_disk_met_by_torch_save_elsewhere_names_the_engine_folder(tmp_path):
    """A write outside the atomic helpers (torch's short write is a RuntimeError): OneLineErrors' folder and what."""
    from ignite.engine import Engine

    from scripts.workflows.handlers import OneLineErrors

    engine = Engine(lambda e, b: None)
    OneLineErrors(tmp_path, "the best-model checkpoint (model.pt)").attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def save(_):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")

    with pytest.raises(DiskFullError) as err:
        engine.run([0], max_epochs=1)
    assert err.value.path == str(tmp_path) and "the best-model checkpoint (model.pt) (short write)" in err.value.reason


def test_an_unnamed_full_disk_still_prints_one_line(capsys):
    from scripts.errors import _excepthook

    exc = OSError(errno.ENOSPC, "No space left on device", "/data/out/a/attention_20x.png")
    found = find_input_error(RuntimeError("wrapped"))
    assert found is None
    try:
        raise RuntimeError("Failed to evaluate") from exc
    except RuntimeError as wrapped:
        _excepthook(RuntimeError, wrapped, wrapped.__traceback__)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: /data/out/a: no space left on the device while writing 'attention_20x.png' (No space left on "
                   "device). Fix: free space on that disk, or pass --output_dir (and --cache_dir, --ckpt_dir) on a disk with "
                   "room, then run the same command again: finished work is kept"]
