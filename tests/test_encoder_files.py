"""Bring your own encoder: exported networks (TorchScript, torch.export) as per-scale encoders, their preprocessing
beside the file, provenance, SimSiam from a given backbone, the planner's probe, and the whole pipeline with a
non-ResNet encoder of another feature and input size."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_bundle, ROOT
from scripts.errors import BundleInputError
from scripts.features.encoder_files import encoder_spec, preprocessing_file
from scripts.features.encoders import build_backbone, build_scale_encoders, encoder_signature, feature_dim


class TinyViT(torch.nn.Module):
    """A small ViT backbone built here (no download): 32 px patches, 2 pre-norm transformer layers, 48-d class token."""

    def __init__(self, size: int = 224, patch: int = 32, dim: int = 48) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = torch.nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.norm(self.blocks(t))[:, 0]


def export_vit(folder: Path, preprocessing: dict | None = None) -> dict[str, Path]:
    """The recipe of docs/encoders.md on a random TinyViT: TorchScript (trace) and torch.export (.pt2)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = TinyViT().eval()
    example = torch.zeros(2, 3, 224, 224)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(net, example), str(folder / "vit.ts"))
    program = torch.export.export(net, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    torch.export.save(program, str(folder / "vit.pt2"))
    if preprocessing is not None:
        (folder / "vit.preprocessing.json").write_text(json.dumps(preprocessing))
    return {"ts": folder / "vit.ts", "pt2": folder / "vit.pt2"}


VIT_PREPROCESSING = {"input_size": 224, "resize_mode": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> dict[str, Path]:
    return export_vit(tmp_path_factory.mktemp("vit"), VIT_PREPROCESSING)


def test_probe_finds_feature_size_input_size_and_dtype(vit, tmp_path):
    spec = encoder_spec(vit["ts"])
    assert (spec.feature_dim, spec.input_size, spec.dtype, spec.resize_mode) == (48, 224, "float32", "bicubic")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.declared == VIT_PREPROCESSING
    assert feature_dim(str(vit["pt2"])) == 48
    bare = export_vit(tmp_path / "bare")  # no preprocessing file: the probe tries 256 (fails), then 224
    spec = encoder_spec(bare["ts"], mean=(0.1, 0.2, 0.3))
    assert spec.input_size == 224 and spec.mean == (0.1, 0.2, 0.3) and spec.declared == {}
    resnet = torch.jit.script(build_backbone("tiny").eval())  # another architecture: fits the patch size as it is
    torch.jit.save(resnet, str(tmp_path / "resnet.ts"))
    spec = encoder_spec(tmp_path / "resnet.ts")
    assert (spec.feature_dim, spec.input_size) == (128, 256)
    assert preprocessing_file(vit["ts"]).name == "vit.preprocessing.json"


def test_exported_encoders_extract_with_their_preprocessing_and_provenance(vit, tiny_demo, tmp_path):
    from scripts.data.manifest import read_manifest
    from scripts.features.extraction import extract_cohort
    from scripts.workflows.pipeline_config import pipeline_parser
    from scripts.workflows.stages import prepare_cohort
    from scripts.wsi.tiling import TilingParams

    records = read_manifest(tiny_demo)[:2]
    tiles = prepare_cohort(records, tmp_path / "cache", TilingParams(max_patches=12, seed=0), progress=False)["tiles"]
    chain = pipeline_parser().get_parsed_content("preprocessing")
    keys = ["scale_0", "scale_1", "scale_2"]
    out = {}
    for kind in ("ts", "pt2"):
        encoders = build_scale_encoders(str(vit[kind]), 3)
        entries = extract_cohort(records, tiles, tmp_path / kind, encoders, str(vit[kind]), chain, keys, batch_size=8, progress=False)
        out[kind] = entries
        f = entries[0].features()
        assert f.shape == (12, 3, 48) and f.dtype == np.float16 and np.isfinite(f).all()
        meta = entries[0].meta
        assert meta["encoders"][0]["arch"] == f"file:vit.{kind}" and meta["encoders"][0]["input"]["input_size"] == 224
        assert meta["encoders"][0]["weights_sha"] == encoder_spec(vit[kind]).sha256  # the file's bytes
    np.testing.assert_allclose(out["ts"][0].features().astype(np.float32), out["pt2"][0].features().astype(np.float32), atol=2e-3)
    # by hand: uint8 patch -> /255 -> bicubic 224 -> (x - 0.5) / 0.5 -> the network
    worker = chain.transforms[0]
    item = worker({"path": records[0].path, "centre": np.load(tiles[0] / "coords.npy")[0].astype(np.float32), "mpp": 0.5, "mpp_force": True})
    x = torch.as_tensor(item["scale_1"])[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=[224, 224], mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        want = torch.jit.load(str(vit["ts"]))((x - 0.5) / 0.5)[0].numpy()
    np.testing.assert_allclose(out["ts"][0].features()[0, 1].astype(np.float32), want, atol=2e-3, rtol=1e-2)
    # another preprocessing beside the same network: a new store entry, never the old features
    other = tmp_path / "other"
    other.mkdir()
    for f in ("vit.ts",):
        (other / f).write_bytes(vit["ts"].read_bytes())
    (other / "vit.preprocessing.json").write_text(json.dumps({**VIT_PREPROCESSING, "mean": [0.4, 0.4, 0.4]}))
    again = extract_cohort(records, tiles, tmp_path / "ts", build_scale_encoders(str(other / "vit.ts"), 3), str(other / "vit.ts"), chain,
                           keys, batch_size=8, progress=False)
    assert again[0].path.name != out["ts"][0].path.name


def test_bad_encoder_files_are_explained(vit, tmp_path):
    torch.save(TinyViT().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(BundleInputError, match="cannot be loaded as an exported encoder"):
        encoder_spec(tmp_path / "weights.pt")
    with pytest.raises(BundleInputError, match="encoder file not found"):
        feature_dim(str(tmp_path / "missing.ts"))

    class Tokens(torch.nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)

    torch.jit.save(torch.jit.script(Tokens()), str(tmp_path / "tokens.ts"))
    with pytest.raises(BundleInputError, match=r"not \[batch, features\]"):
        encoder_spec(tmp_path / "tokens.ts")
    (tmp_path / "vit.ts").write_bytes(vit["ts"].read_bytes())
    (tmp_path / "vit.preprocessing.json").write_text('{"input_size": 224, "norm": 1}')
    with pytest.raises(BundleInputError, match="unknown field"):
        encoder_spec(tmp_path / "vit.ts")
    with pytest.raises(BundleInputError, match="carries its own weights"):
        build_scale_encoders(str(vit["ts"]), 3, weights=["a.pt", "b.pt", "c.pt"])
    with pytest.raises(BundleInputError, match="SimSiam pretraining builds a built-in architecture"):
        build_backbone(str(vit["ts"]))


def test_simsiam_starts_from_a_given_backbone(tiny_demo, tmp_path, caplog):
    import logging

    from scripts.data.manifest import read_manifest
    from scripts.features.simsiam import pretrain_scales
    from scripts.workflows.pipeline_config import pipeline_parser
    from scripts.workflows.stages import prepare_cohort
    from scripts.wsi.tiling import TilingParams

    records = read_manifest(tiny_demo)[:2]
    tiles = prepare_cohort(records, tmp_path / "cache", TilingParams(max_patches=8, seed=0), progress=False)["tiles"]
    torch.manual_seed(7)
    start = build_backbone("tiny").eval()
    torch.jit.save(torch.jit.script(start), str(tmp_path / "start.ts"))  # an exported network of the same architecture
    transform = pipeline_parser().get_parsed_content("pretrain_transform")
    kw = dict(scales_mpp=[0.5, 1.0, 2.0], pretrain_scales_mpp=[2.0], arch="tiny", epochs=1, batch_size=8, base_lr=0.0,
              max_patches_per_slide=4, seed=0, progress=False)
    with caplog.at_level(logging.INFO, logger="scripts.features.simsiam"):
        init = pretrain_scales(records, tiles, tmp_path / "pre", transform, init_weights=str(tmp_path / "start.ts"), **kw)
    assert "backbone starts from" in caplog.text
    state = torch.load(init[2], weights_only=True)
    assert torch.equal(state["conv1.weight"], start.conv1.weight)  # lr 0: the weights are the given backbone's
    scratch = pretrain_scales(records, tiles, tmp_path / "pre", transform, **kw)
    assert scratch[2] != init[2]  # another starting point trains (and caches) separately
    assert not torch.equal(torch.load(scratch[2], weights_only=True)["conv1.weight"], start.conv1.weight)
    with pytest.raises(BundleInputError, match="not found"):
        pretrain_scales(records, tiles, tmp_path / "pre", transform, init_weights=str(tmp_path / "nope.pt"), **kw)


def test_planner_probes_the_chosen_encoder(vit):
    from scripts.plan import probe_rate

    fast, slow = probe_rate("tiny", 3, batch_size=4, repeats=1), probe_rate(str(vit["ts"]), 3, batch_size=4, repeats=1)
    assert fast > 0 and slow > 0 and np.isfinite([fast, slow]).all()


@pytest.mark.slow
def test_training_with_an_exported_vit_end_to_end(vit, tiny_demo, tmp_path):
    """Acceptance of issue 17: `run training --encoder_arch vit.ts` (48-d features, 224 px input) -> inference maps ->
    Deploy export -> the Deploy app, which gives the bundle's probability."""
    from scripts.deploy.runtime import DeployModels

    data = dict(dataset_dir=str(tiny_demo.parent), output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"))
    run_bundle("train.yaml", max_epochs=2, val_fraction=0.5, encoder_arch=str(vit["ts"]), **data)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["input_mean"].shape == (48,)  # the ViT's feature size reached the MIL model
    run_bundle("inference.yaml", input=str(tiny_demo.parent / "slides" / "demo-p001-s0.tif"), num_bags=5,
               **data)  # encoder_arch comes from the checkpoint
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == 1 and (tmp_path / "out" / "demo-p001-s0" / "attention_5x.png").is_file()
    run_bundle("deploy.yaml", deploy_dir=str(tmp_path / "deploy"), num_bags=5, ckpt_dir=str(tmp_path / "models"))
    models = DeployModels(tmp_path / "deploy")
    assert models.settings["contract"]["encoders"][0]["input"]["input_size"] == 224
    enc = models.encoders[0]
    assert enc(torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)).shape == (2, 48)  # uint8 in, 48-d out
    app = subprocess.run([sys.executable, "deploy", "-i", str(tiny_demo.parent / "slides" / "demo-p001-s0.tif"), "-o", str(tmp_path / "app"),
                          "-m", str(tmp_path / "deploy")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         )
    assert app.returncode == 0, app.stderr[-3000:]
    got = list(csv.DictReader(open(tmp_path / "app" / "predictions.csv")))[0]
    assert abs(float(got["probability"]) - float(rows[0]["probability"])) < 1e-4


def test_a_torch_export_encoder_goes_into_the_deploy_repository(vit, tmp_path):
    from scripts.deploy.export import PROGRAM_FILE, load_encoder
    from scripts.deploy.export import _check_encoder, _scriptable

    enc = build_scale_encoders(str(vit["pt2"]), 3)[0]
    assert not _scriptable(enc)
    folder = tmp_path / "encoder_20x"
    folder.mkdir()
    from scripts.deploy.export import INPUT_FILE
    from scripts.features.encoder_files import input_settings

    (folder / PROGRAM_FILE).write_bytes(vit["pt2"].read_bytes())
    (folder / INPUT_FILE).write_text(json.dumps(input_settings(enc.preprocess)))
    _check_encoder(enc, folder / PROGRAM_FILE, 256)  # reloaded = eager on uint8 patches
    x = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8)
    assert torch.allclose(load_encoder(folder)(x), enc(x), atol=1e-5)
    assert encoder_signature(enc, str(vit["pt2"]))["weights_sha"] == encoder_spec(vit["pt2"]).sha256
