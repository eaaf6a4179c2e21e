"""One test per row of the bad-input table in docs/errors.md: each bad input raises a BundleInputError whose
message names the file (or row), the reason and the fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from feature_cohort import write_entry
from scripts.errors import BundleInputError
from scripts.wsi.pyramid import write_pyramid


def _manifest(tmp: Path, rows: list[str], header: str = "slide_id,patient_id,path,label") -> Path:
    p = tmp / "manifest.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


def _slide(tmp: Path, name: str = "s.tif", size: int = 512, mpp: float | None = 0.5, value: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), value, np.uint8) if value is not None else rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    return write_pyramid(tmp / name, img, mpp=mpp, downsamples=(1, 2), compression="deflate")


def _read(tmp, rows, header="slide_id,patient_id,path,label"):
    from scripts.data.manifest import read_manifest

    _slide(tmp)
    return read_manifest(_manifest(tmp, rows, header))


def _open(path, **kw):
    from scripts.wsi.slide import SlideReader

    with SlideReader(path, **kw) as s:
        return s


def _prepare(path, **kw):
    from scripts.wsi.tiling import TilingParams, prepare_slide

    return prepare_slide("x", path, path.parent / "cache", TilingParams(**kw))


def case_deploy_model_folder_not_exported(tmp):
    from scripts.deploy.runtime import DeployModels

    (tmp / "models").mkdir()
    torch.save({}, tmp / "models" / "model.pt")  # e.g. the checkpoint folder instead of the exported one
    DeployModels(tmp / "models")


def case_manifest_missing(tmp):
    from scripts.data.manifest import read_manifest

    read_manifest(tmp / "nope.csv")


def case_manifest_missing_column(tmp):
    _read(tmp, ["a,p1,s.tif"], header="slide_id,patient_id,path")


def case_manifest_no_rows(tmp):
    _read(tmp, [])


def case_manifest_empty_slide_id(tmp):
    _read(tmp, [",p1,s.tif,1"])


def case_manifest_empty_patient_id(tmp):
    _read(tmp, ["a,,s.tif,1"])


def case_manifest_duplicate_slide_id(tmp):
    _read(tmp, ["a,p1,s.tif,1", "a,p2,s.tif,0"])


def case_manifest_unknown_label(tmp):
    _read(tmp, ["a,p1,s.tif,CD"])


def case_manifest_missing_slide_file(tmp):
    _read(tmp, ["a,p1,missing.svs,1"])


def case_manifest_bad_mpp(tmp):
    _read(tmp, ["a,p1,s.tif,1,0.5x"], header="slide_id,patient_id,path,label,mpp")


def case_patient_in_two_partitions(tmp):
    from scripts.workflows.splits import train_val_split

    train_val_split(["a", "b", "c", "d"], ["p1", "p1", "p2", "p3"], [1, 1, 0, 1], given=["train", "val", "train", "val"])


def case_too_few_patients_for_folds(tmp):
    from scripts.workflows.splits import train_val_split

    train_val_split(["a", "b", "c"], ["p1", "p2", "p3"], [1, 0, 0], val_fraction=0.25)


def case_too_few_patients_for_evaluation_splits(tmp):
    from scripts.workflows.splits import protocol_splits

    protocol_splits([f"s{i}" for i in range(6)], [f"p{i}" for i in range(6)], [i % 2 for i in range(6)], num_splits=10)


def case_slide_not_a_slide(tmp):
    p = tmp / "notes.svs"
    p.write_text("this is not a slide")
    _open(p)


def case_slide_truncated(tmp):
    p = _slide(tmp, size=1024)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    _prepare(p)


def case_slide_without_mpp(tmp):
    _open(_slide(tmp, mpp=None))


def case_slide_absurd_mpp(tmp):
    _open(_slide(tmp), mpp=50.0)


def case_scale_finer_than_native(tmp):
    from scripts.wsi.slide import SlideReader

    with SlideReader(_slide(tmp)) as s:
        s.plan(0.25, 256)


def case_slide_without_tissue(tmp):
    _prepare(_slide(tmp, size=1024, value=243))


def case_slide_absurd_size(tmp):
    _open(write_pyramid(tmp / "tiny.tif", np.zeros((40, 40, 3), np.uint8), mpp=0.5, downsamples=(1,)))


def case_unknown_backend(tmp):
    _open(_slide(tmp), backend="pillow")


def case_unknown_error_policy(tmp):
    from scripts.workflows.failures import check_policy

    check_policy("ignore")


def case_inference_folder_without_slides(tmp):
    from scripts.inference.inputs import input_records

    (tmp / "empty").mkdir()
    input_records(tmp / "empty")


def case_features_with_nan(tmp):
    from scripts.mil.bags import BagDataset

    f = np.random.default_rng(0).normal(size=(16, 3, 8))
    f[3, 1, 2] = np.nan
    BagDataset([write_entry(tmp, "nan", "p1", 1, f, np.zeros(16, int))], num_clusters=1)


def case_training_loss_nan(tmp):
    from ignite.engine import Engine

    from scripts.workflows.handlers import NonFiniteLossGuard

    engine = Engine(lambda e, b: {"loss": float("nan")})
    NonFiniteLossGuard().attach(engine)
    engine.run([0], max_epochs=1)


def case_encoder_weights_mismatch(tmp):
    from scripts.features.encoders import build_scale_encoders

    p = tmp / "enc.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, p)
    build_scale_encoders("tiny", 1, [str(p)])


def case_checkpoint_mismatch(tmp):
    from scripts.inference.predict import load_network
    from scripts.mil.networks import CSMIL

    p = tmp / "model.pt"
    torch.save(CSMIL(in_features=128).state_dict(), p)
    load_network(CSMIL(in_features=2048), p)


def case_checkpoint_missing(tmp):
    from scripts.inference.predict import load_network
    from scripts.mil.networks import CSMIL

    load_network(CSMIL(in_features=128), tmp / "models" / "model.pt")


#: case -> words the message must contain (besides the fix)
CASES = {
    "manifest_missing": (case_manifest_missing, "manifest not found"),
    "manifest_missing_column": (case_manifest_missing_column, "missing column"),
    "manifest_no_rows": (case_manifest_no_rows, "no rows"),
    "manifest_empty_slide_id": (case_manifest_empty_slide_id, "empty slide_id"),
    "manifest_empty_patient_id": (case_manifest_empty_patient_id, "empty patient_id"),
    "manifest_duplicate_slide_id": (case_manifest_duplicate_slide_id, "duplicate slide_id"),
    "manifest_unknown_label": (case_manifest_unknown_label, "unknown label"),
    "manifest_missing_slide_file": (case_manifest_missing_slide_file, "does not exist"),
    "manifest_bad_mpp": (case_manifest_bad_mpp, "not a number"),
    "patient_in_two_partitions": (case_patient_in_two_partitions, "appears in both"),
    "too_few_patients_for_folds": (case_too_few_patients_for_folds, "cannot make"),
    "too_few_patients_for_evaluation_splits": (case_too_few_patients_for_evaluation_splits, "too few"),
    "slide_not_a_slide": (case_slide_not_a_slide, "cannot be opened"),
    "slide_truncated": (case_slide_truncated, ""),
    "slide_without_mpp": (case_slide_without_mpp, "no microns-per-pixel"),
    "slide_absurd_mpp": (case_slide_absurd_mpp, "plausible range"),
    "scale_finer_than_native": (case_scale_finer_than_native, "finer than the slide's native"),
    "slide_without_tissue": (case_slide_without_tissue, "no tissue"),
    "slide_absurd_size": (case_slide_absurd_size, "implausible slide size"),
    "unknown_backend": (case_unknown_backend, "unknown WSI backend"),
    "unknown_error_policy": (case_unknown_error_policy, "unknown policy"),
    "inference_folder_without_slides": (case_inference_folder_without_slides, "no slide files"),
    "features_with_nan": (case_features_with_nan, "NaN/Inf"),
    "training_loss_nan": (case_training_loss_nan, "loss is nan"),
    "encoder_weights_mismatch": (case_encoder_weights_mismatch, "missing"),
    "checkpoint_mismatch": (case_checkpoint_mismatch, "shape"),
    "checkpoint_missing": (case_checkpoint_missing, "not found"),
    "deploy_model_folder_not_exported": (case_deploy_model_folder_not_exported, "no csmil/model.ts"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_explained(name, tmp_path):
    fn, words = CASES[name]
    with pytest.raises(BundleInputError) as err:
        fn(tmp_path)
    e = err.value
    assert e.path and e.path != "<input>" or name.startswith("too_few"), e
    assert words.lower() in e.reason.lower(), e
    assert len(e.fix) > 10, e
    if name.startswith(("manifest_", "slide_", "scale_", "checkpoint_", "features_", "unknown_backend", "deploy_")):
        assert str(tmp_path) in e.path or "training" in e.path, e  # the offending file (or row) is named


def test_docs_table_lists_every_case():
    table = (ROOT / "docs" / "errors.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_0-9]+)` \|", table, flags=re.M))
    assert listed == set(CASES), (sorted(set(CASES) - listed), sorted(listed - set(CASES)))
    assert len(listed) >= 20


def test_manifest_errors_name_the_row(tmp_path):
    with pytest.raises(BundleInputError, match=r"manifest\.csv:3"):
        _read(tmp_path, ["a,p1,s.tif,1", "a,p2,s.tif,0"])
    assert json.dumps({"ok": True})
