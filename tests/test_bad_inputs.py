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
    _open(_slide(tmp, mpp=None), mpp=50.0)  # a slide without metadata: the override is used, and implausible


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
    from scripts.data.bags import BagDataset

    f = np.random.default_rng(0).normal(size=(16, 3, 8))
    f[3, 1, 2] = np.nan
    BagDataset([write_entry(tmp, "nan", "p1", 1, f, np.zeros(16, int))], num_clusters=1)


def case_training_loss_nan(tmp):
    from ignite.engine import Engine

    from scripts.workflows.handlers import LossGuard

    engine = Engine(lambda e, b: {"loss": float("nan")})
    LossGuard().attach(engine)
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


def _validate(**values):
    from scripts.config_checks import validate

    validate(values)


def case_config_out_of_range(tmp):
    _validate(patch_size=0)


def case_config_not_a_number(tmp):
    _validate(mpp="abc")


def case_config_unknown_model(tmp):
    _validate(mil_model="csmill")


def case_config_not_a_boolean(tmp):
    _validate(progress="maybe")


def case_config_scales_not_ascending(tmp):
    _validate(scales_mpp=[2.0, 1.0, 0.5])


def case_config_cluster_scale_not_a_scale(tmp):
    _validate(scales_mpp=[0.5], cluster_scale_mpp=2.0)


def case_config_backend_not_installed(tmp):
    import sys

    saved = sys.modules.get("cucim")
    sys.modules["cucim"] = None  # as on a CPU install without cuCIM
    try:
        _validate(wsi_backend="cucim")
    finally:
        if saved is None:
            sys.modules.pop("cucim", None)
        else:
            sys.modules["cucim"] = saved


def case_config_device_unavailable(tmp):
    _validate(device="cuda:99")


def case_config_output_dir_is_a_file(tmp):
    (tmp / "out").write_text("x")
    _validate(output_dir=str(tmp / "out"))


def case_config_output_dir_not_writable(tmp):
    (tmp / "file").write_text("x")
    _validate(output_dir=str(tmp / "file" / "out"))  # below a file: cannot be created (root ignores permissions)


def case_checkpoint_truncated(tmp):
    from scripts.inference.predict import load_network
    from scripts.mil.networks import CSMIL

    net = CSMIL(in_features=16)
    torch.save(net.state_dict(), tmp / "model.pt")
    data = (tmp / "model.pt").read_bytes()
    (tmp / "model.pt").write_bytes(data[: len(data) // 2])
    load_network(net, tmp / "model.pt")


def case_slide_mpp_override_contradicts_metadata(tmp):
    _open(_slide(tmp, mpp=0.5), mpp=0.25)


def case_slide_smaller_than_field(tmp):
    _prepare(_slide(tmp, size=300))  # 150 µm < 256 px x 2 µm/px


def case_slide_grayscale(tmp):
    yy, xx = np.mgrid[0:1024, 0:1024]
    grey = ((np.sin(xx / 20.0) * np.cos(yy / 30.0) + 1) * 100).astype(np.uint8)
    _prepare(write_pyramid(tmp / "grey.tif", np.stack([grey] * 3, -1), mpp=0.5, downsamples=(1, 2), compression="deflate"))


def case_slide_tissue_below_min_tissue(tmp):
    img = np.full((2048, 2048, 3), 243, np.uint8)
    img[1000:1100, 1000:1100] = (150, 60, 160)  # a 50 µm fragment: far below half of a 128 µm patch
    _prepare(write_pyramid(tmp / "speck.tif", img, mpp=0.5, downsamples=(1, 2, 4), compression="deflate"), tissue=_speck_tissue())


def _speck_tissue():
    from scripts.wsi.tissue import TissueParams

    return TissueParams(min_area_um2=100.0)


def case_slide_other_backend_reads_it(tmp):
    import tifffile

    img = np.random.default_rng(0).integers(50, 200, (1024, 1024, 3), dtype=np.uint8)
    tifffile.imwrite(tmp / "plain.tif", img, photometric="rgb")  # a plain (untiled, single-level) TIFF
    _open(tmp / "plain.tif")


def case_cohort_one_class(tmp):
    from scripts.workflows.splits import train_val_split

    train_val_split(["a", "b", "c", "d"], ["p1", "p2", "p3", "p4"], [1, 1, 1, 1], where=str(tmp / "manifest.csv"))


def _read_survival(tmp, rows, header="slide_id,patient_id,path,time,event"):
    from scripts.data.manifest import read_manifest

    _slide(tmp)
    return read_manifest(_manifest(tmp, rows, header), task="survival")


def case_manifest_survival_missing_columns(tmp):
    _read_survival(tmp, ["a,p1,s.tif,1"], header="slide_id,patient_id,path,label")


def case_manifest_survival_negative_time(tmp):
    _read_survival(tmp, ["a,p1,s.tif,-3,1"])


def case_manifest_survival_bad_event(tmp):
    _read_survival(tmp, ["a,p1,s.tif,12,yes"])


def case_manifest_survival_no_events(tmp):
    _read_survival(tmp, ["a,p1,s.tif,12,0"])


def case_label_map_not_numbered(tmp):
    from scripts.tasks.labels import class_names

    class_names({"normal": 0, "crohn": 2})


def case_manifest_same_file_twice(tmp):
    _read(tmp, ["a,p1,s.tif,1", "b,p2,s.tif,0"])


def case_manifest_bad_split(tmp):
    _read(tmp, ["a,p1,s.tif,1,training"], header="slide_id,patient_id,path,label,split")


def _contract_checkpoint(tmp):
    from scripts.checkpoint import contract
    from scripts.mil.networks import CSMIL

    net = contract.attach(CSMIL(in_features=16, num_clusters=4), contract.make_contract(
        mil_model="csmil", scales_mpp=[0.5, 1.0, 2.0], patch_size=256, num_clusters=4, cluster_scale_mpp=2.0, encoder_arch="tiny",
        in_features=16, label_map={"0": 0, "1": 1}))
    torch.save(net.state_dict(), tmp / "model.pt")
    return net


def case_checkpoint_other_settings(tmp):
    from scripts.checkpoint.trained import TrainedModel

    _contract_checkpoint(tmp)
    TrainedModel(tmp / "model.pt", {"scales_mpp": [0.5, 2.0]})  # inference / export with --scales_mpp "[0.5,2.0]"


def _config_parser(*names):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(ROOT / "configs" / n) for n in names])
    p["bundle_root"] = str(ROOT)
    return p


def case_command_line_unknown_id(tmp):
    from scripts.workflows.command import check_command_line

    check_command_line(_config_parser("train.yaml"), {"run_id": "run", "config_files": ["configs/train.yaml"], "ids": ["patch_sizee"]})


def case_command_line_unknown_stage(tmp):
    from scripts.workflows.command import check_command_line

    check_command_line(_config_parser("train.yaml"), {"run_id": "trainning", "config_files": ["configs/train.yaml"], "ids": []})


def case_evaluate_overlay_alone(tmp):
    from scripts.errors import find_input_error

    p = _config_parser("evaluate.yaml")
    try:
        for i in range(len(p["initialize"])):
            p.get_parsed_content(f"initialize#{i}")
    except Exception as err:  # MONAI wraps what an expression raises
        raise find_input_error(err) or err


def case_checkpoint_other_encoders(tmp):
    from types import SimpleNamespace

    from scripts.checkpoint import contract

    net = _contract_checkpoint(tmp)
    net.csmil_contract["encoders"] = [{"arch": "tiny", "weights_sha": "aaaa"}]
    net.csmil_contract["preprocessing_hash"] = "p"
    entry = SimpleNamespace(path=tmp / "e", meta={"encoders": [{"arch": "tiny", "weights_sha": "bbbb"}], "preprocessing": {}})
    contract.check_features(net, [entry], tmp / "model.pt")


def case_encoder_file_not_exported(tmp):
    import torch

    from scripts.features.encoder_files import encoder_spec
    from scripts.features.encoders import build_backbone

    torch.save(build_backbone("tiny").state_dict(), tmp / "encoder.pt")  # a state dict, not an exported network
    encoder_spec(tmp / "encoder.pt")


def _offline_hub(tmp):
    import os

    os.environ.update(HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1")  # restored by the test (monkeypatched environment)
    os.environ.pop("HF_HUB_CACHE", None)


def case_named_encoder_not_cached(tmp):
    from scripts.features.foundation import build_named_encoder

    _offline_hub(tmp)
    build_named_encoder("uni")


def case_named_encoder_map_without_name(tmp):
    from scripts.features.foundation import build_named_encoder

    (tmp / "encoders.json").write_text('{"virchow2": "/models/virchow2.safetensors"}')
    build_named_encoder("uni", tmp / "encoders.json")


def case_named_encoder_wrong_layout(tmp):
    import torch

    from scripts.features.foundation import build_named_encoder, build_network

    torch.save(build_network("vit-test").state_dict(), tmp / "pytorch_model.bin")  # timm names, phikon is a transformers ViT
    build_named_encoder("phikon", tmp / "pytorch_model.bin")


def case_named_encoder_gated(tmp):
    import os

    from hub_server import fake_hub
    from scripts.features.foundation import build_named_encoder

    with fake_hub() as endpoint:  # answers as the Hugging Face hub does for a gated repository
        os.environ.update(HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint)
        build_named_encoder("uni")


def case_stain_target_not_found(tmp):
    from scripts.features.stain import target_from_file

    target_from_file("macenko", str(tmp / "reference_tile.png"))


def case_stain_views_missing(tmp):
    from scripts.data.manifest import SlideRecord
    from scripts.features.stain_views import StainViews, load_views
    from scripts.features.store import FeatureEntry

    entry = tmp / "features" / "slide-1-abc"
    entry.mkdir(parents=True)
    np.save(entry / "features.npy", np.zeros((4, 3, 8), np.float16))
    (entry / "meta.json").write_text("{}")
    load_views(FeatureEntry(entry, SlideRecord("slide-1", "p1", str(tmp / "slide-1.tif"), 1)), StainViews(4))


def case_dicom_slide_other_backend(tmp):
    (tmp / "case-7").mkdir()
    (tmp / "case-7" / "level0.dcm").write_bytes(b"DICM")  # a series folder (the backend is refused before reading)
    _open(tmp / "case-7", backend="tifffile")


def case_encoder_file_returns_tokens(tmp):
    import torch

    from scripts.features.encoder_files import encoder_spec

    class Tokens(torch.nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)

    torch.jit.save(torch.jit.script(Tokens()), str(tmp / "vit.ts"))
    encoder_spec(tmp / "vit.ts")


def case_encoder_preprocessing_unknown_field(tmp):
    import json

    import torch

    from scripts.features.encoder_files import encoder_spec
    from scripts.features.encoders import build_backbone

    torch.jit.save(torch.jit.script(build_backbone("tiny").eval()), str(tmp / "vit.ts"))
    (tmp / "vit.preprocessing.json").write_text(json.dumps({"input_size": 224, "norm_mean": [0.5, 0.5, 0.5]}))
    encoder_spec(tmp / "vit.ts")


#: case -> words the message must contain (besides the fix)

def case_manifest_is_a_folder(tmp):
    from scripts.data.manifest import read_manifest

    (tmp / "cohort").mkdir()
    read_manifest(tmp / "cohort")


def case_manifest_slide_path_is_a_folder(tmp):
    (tmp / "slides").mkdir()
    _read(tmp, ["a,p1,slides,1"])


def case_manifest_mpp_out_of_range(tmp):
    _read(tmp, ["a,p1,s.tif,1,-0.5"], header="slide_id,patient_id,path,label,mpp")


def case_manifest_ids_differ_only_in_case(tmp):
    _slide(tmp, "t.tif")
    _read(tmp, ["Case1,p1,s.tif,1", "case1,p2,t.tif,0"])


def case_checkpoint_is_a_folder(tmp):
    from scripts.inference.predict import load_network
    from scripts.mil.networks import CSMIL

    (tmp / "models" / "model.pt").mkdir(parents=True)
    load_network(CSMIL(in_features=128), tmp / "models" / "model.pt")


def case_checkpoint_pickled_module(tmp):
    from scripts.inference.predict import load_network
    from scripts.mil.networks import CSMIL

    torch.save(CSMIL(in_features=128), tmp / "model.pt")  # the whole module pickled, not its state dict
    load_network(CSMIL(in_features=128), tmp / "model.pt")


def case_slide_is_a_picture(tmp):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(60, 200, (300, 400, 3), dtype=np.uint8)).save(tmp / "photo.jpg")
    _open(tmp / "photo.jpg")


def case_slide_metadata_mpp_implausible(tmp):
    _open(_slide(tmp, mpp=0.01))  # the header claims 0.01 µm/px; the fix (an mpp override) is tested to work


def case_training_diverged(tmp):
    from ignite.engine import Engine

    from scripts.workflows.handlers import LossGuard

    engine = Engine(lambda e, b: {"loss": 1.5e22})  # what --learning_rate 1e6 gives in the first epoch
    LossGuard(learning_rate=1e6).attach(engine)
    engine.run([0, 1], max_epochs=2)


def case_training_diverged_published_recipe(tmp):
    from ignite.engine import Engine

    from scripts.mil.recipe import TRANSMIL
    from scripts.workflows.handlers import LossGuard

    # a head on its published recipe: --learning_rate does not set its rate, so the fix must not name it alone
    engine = Engine(lambda e, b: {"loss": float("nan")})
    LossGuard(learning_rate=5e-4, recipe=TRANSMIL).attach(engine)
    engine.run([0, 1], max_epochs=2)


def case_disk_full(tmp):
    import errno
    from unittest import mock

    from scripts.cache import atomic_write_bytes

    # what a full device answers (the real thing, a small tmpfs, is tests/test_disk_full.py)
    with mock.patch("os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        atomic_write_bytes(tmp / "out" / "predictions.csv", b"slide_id\n")


CASES = {
    "manifest_missing": (case_manifest_missing, "manifest not found"),
    "stain_target_not_found": (case_stain_target_not_found, "stain target image not found"),
    "stain_views_missing": (case_stain_views_missing, "has no stain views for these settings"),
    "dicom_slide_other_backend": (case_dicom_slide_other_backend, "DICOM-WSI series, which the tifffile backend does not read"),
    "named_encoder_not_cached": (case_named_encoder_not_cached, "not in this Hugging Face cache"),
    "named_encoder_map_without_name": (case_named_encoder_map_without_name, "has no entry for encoder 'uni'"),
    "named_encoder_wrong_layout": (case_named_encoder_wrong_layout, "is not a transformers vit checkpoint"),
    "named_encoder_gated": (case_named_encoder_gated, "is gated on the Hugging Face hub"),
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
    "config_out_of_range": (case_config_out_of_range, "an integer in [32, 4096]"),
    "config_not_a_number": (case_config_not_a_number, "as a number"),
    "config_not_a_boolean": (case_config_not_a_boolean, "True or False"),
    "config_unknown_model": (case_config_unknown_model, "is not a model of the bundle (did you mean 'csmil'?)"),
    "config_scales_not_ascending": (case_config_scales_not_ascending, "ascending"),
    "config_cluster_scale_not_a_scale": (case_config_cluster_scale_not_a_scale, "is not one of scales_mpp"),
    "config_backend_not_installed": (case_config_backend_not_installed, "cannot be imported"),
    "config_device_unavailable": (case_config_device_unavailable, "cuda"),
    "config_output_dir_is_a_file": (case_config_output_dir_is_a_file, "existing file"),
    "config_output_dir_not_writable": (case_config_output_dir_not_writable, "cannot be written"),
    "checkpoint_truncated": (case_checkpoint_truncated, "cannot be read as a model checkpoint"),
    "slide_mpp_override_contradicts_metadata": (case_slide_mpp_override_contradicts_metadata, "metadata says 0.5"),
    "slide_smaller_than_field": (case_slide_smaller_than_field, "smaller than the coarsest scale"),
    "slide_grayscale": (case_slide_grayscale, "no colour"),
    "slide_tissue_below_min_tissue": (case_slide_tissue_below_min_tissue, "no patch has"),
    "slide_other_backend_reads_it": (case_slide_other_backend_reads_it, "cannot be opened"),
    "cohort_one_class": (case_cohort_one_class, "at least two classes"),
    "manifest_survival_missing_columns": (case_manifest_survival_missing_columns, "missing column(s) ['time', 'event']"),
    "manifest_survival_negative_time": (case_manifest_survival_negative_time, "negative"),
    "manifest_survival_bad_event": (case_manifest_survival_bad_event, "is not 0 or 1"),
    "manifest_survival_no_events": (case_manifest_survival_no_events, "no slide has an event"),
    "label_map_not_numbered": (case_label_map_not_numbered, "numbered 0..K-1"),
    "manifest_same_file_twice": (case_manifest_same_file_twice, "already listed"),
    "manifest_bad_split": (case_manifest_bad_split, "is not one of"),
    "checkpoint_other_settings": (case_checkpoint_other_settings, "trained with scales_mpp = [0.5,1,2]"),
    "command_line_unknown_id": (case_command_line_unknown_id, "is not an id of train.yaml"),
    "command_line_unknown_stage": (case_command_line_unknown_stage, "has no stage 'trainning'"),
    "evaluate_overlay_alone": (case_evaluate_overlay_alone, "overlay on configs/train.yaml"),
    "checkpoint_other_encoders": (case_checkpoint_other_encoders, "features of encoders"),
    "encoder_file_not_exported": (case_encoder_file_not_exported, "cannot be loaded as an exported encoder"),
    "encoder_file_returns_tokens": (case_encoder_file_returns_tokens, "not [batch, features]"),
    "encoder_preprocessing_unknown_field": (case_encoder_preprocessing_unknown_field, "unknown field"),
    "manifest_is_a_folder": (case_manifest_is_a_folder, "is a folder, not a manifest file"),
    "manifest_slide_path_is_a_folder": (case_manifest_slide_path_is_a_folder, "is a folder, not a slide file"),
    "manifest_mpp_out_of_range": (case_manifest_mpp_out_of_range, "outside the plausible range"),
    "manifest_ids_differ_only_in_case": (case_manifest_ids_differ_only_in_case, "only in letter case"),
    "checkpoint_is_a_folder": (case_checkpoint_is_a_folder, "is a folder, not a checkpoint file"),
    "checkpoint_pickled_module": (case_checkpoint_pickled_module, "pickled Python object"),
    "slide_is_a_picture": (case_slide_is_a_picture, "is a JPEG picture, not a whole-slide image"),
    "slide_metadata_mpp_implausible": (case_slide_metadata_mpp_implausible, "metadata says 0.01 µm/px, outside the plausible range"),
    "training_diverged": (case_training_diverged, "training diverged"),
    "training_diverged_published_recipe": (case_training_diverged_published_recipe, "training diverged"),
    "disk_full": (case_disk_full, "no space left on the device while writing 'predictions.csv'"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_explained(name, tmp_path, monkeypatch):
    for var in ("HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE"):  # cases may set them: restored afterwards
        monkeypatch.delenv(var, raising=False)
    fn, words = CASES[name]
    with pytest.raises(BundleInputError) as err:
        fn(tmp_path)
    e = err.value
    assert e.path and e.path != "<input>" or name.startswith("too_few"), e
    assert words.lower() in e.reason.lower(), e
    assert len(e.fix) > 10, e
    if name.startswith(("manifest_", "slide_", "scale_", "checkpoint_", "features_", "unknown_backend", "deploy_", "disk_")):
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
