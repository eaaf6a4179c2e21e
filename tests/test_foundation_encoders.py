"""Foundation encoders by name (scripts/features/foundation.py), and with stain normalisation through the pipeline: every registry entry builds on the meta device with
its model card's size, transformers checkpoints map onto the timm layout exactly, weights come from a Hugging Face
cache folder the test writes (offline), a file or a JSON map, a missing or gated model stops with one line, and the
test entry runs the whole pipeline offline. Nothing is downloaded: the gated case talks to a local server that
answers as the hub does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts.errors import BundleInputError
from scripts.features.encoders import build_scale_encoders, encoder_signature, feature_dim
from scripts.features.foundation import REGISTRY, build_named_encoder, build_network, load_weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hf_cache(home: Path, repo_id: str, filename: str, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face hub cache as the hub client leaves it (``<HF_HOME>/hub/models--org--name/{refs,snapshots}``)."""
    from safetensors.torch import save_file

    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / filename))
    return snap / filename


def entry_state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = build_network("vit-test")
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net.state_dict()


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    write_hf_cache(home, REGISTRY["vit-test"].hub_id, "model.safetensors", entry_state())
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_every_registry_entry_builds_on_meta_with_its_model_cards_size():
    assert len(REGISTRY) >= 12
    for name, e in REGISTRY.items():
        with torch.device("meta"):
            net = build_network(name)
            out = net(torch.empty(2, 3, e.input_size, e.input_size))
        count = sum(p.numel() for p in net.parameters()) / 1e6
        assert abs(count - e.params_m) <= max(0.015 * e.params_m, 0.1), (name, count, e.params_m)
        assert tuple(out.shape) == (2, e.feature_dim) == (2, feature_dim(name)), name
        assert e.hub_id.count("/") == 1 and e.licence and e.layout in ("timm", "hf_vit", "hf_dinov2")
    assert REGISTRY["uni"].feature_dim == 1024 and REGISTRY["virchow2"].feature_dim == 2560  # class + mean patch token
    assert REGISTRY["h-optimus-0"].mean != REGISTRY["uni"].mean  # its own normalisation


def published_names(state: dict, vit: bool) -> dict:
    """transformers 5 parameter names -> those of the published (transformers 4) checkpoints on the hub."""
    import re

    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", k)
        for a, b in (("q_proj", "attention.query"), ("k_proj", "attention.key"), ("v_proj", "attention.value"), ("o_proj", "output.dense")):
            k = k.replace(f".attention.{a}.", f".attention.{b}.")
        out[k.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.") if vit else k] = v.contiguous()
    return out


@pytest.mark.parametrize("name", ["phikon", "phikon-v2", "hibou-b"])
def test_transformers_checkpoints_give_transformers_outputs(name, tmp_path):
    """The hf_vit / hf_dinov2 layouts (with and without registers) map onto the timm layout: the same embedding as
    the transformers model on the same random weights (two blocks), from a checkpoint in the published layout (which
    transformers' own loader reads back to the same outputs) and in transformers 5's."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from scripts.features.vit import VisionTransformer

    a = REGISTRY[name].arch
    vit = REGISTRY[name].layout == "hf_vit"
    common = dict(hidden_size=a["embed_dim"], num_hidden_layers=2, num_attention_heads=a["num_heads"], intermediate_size=int(a["embed_dim"] * a["mlp_ratio"]),
                  image_size=a["img_size"], patch_size=a["patch_size"], layer_norm_eps=a.get("norm_eps", 1e-6), hidden_act="gelu")
    torch.manual_seed(0)
    if vit:
        cls, config = transformers.ViTModel, transformers.ViTConfig(**common)
    elif a.get("reg_tokens"):
        cls, config = transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=a["reg_tokens"])
    else:
        cls, config = transformers.Dinov2Model, transformers.Dinov2Config(**common)
    ref = cls(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, a["img_size"], a["img_size"])
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state[:, 0]
    published = tmp_path / "published"
    config.save_pretrained(published)
    save_file(published_names(ref.state_dict(), vit), str(published / "model.safetensors"))
    with torch.no_grad():  # transformers reads the published layout back to the same network
        torch.testing.assert_close(cls.from_pretrained(published).eval()(pixel_values=x).last_hidden_state[:, 0], want)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "v5.safetensors"))
    for path in (published / "model.safetensors", tmp_path / "v5.safetensors"):
        ours = VisionTransformer(**{**a, "depth": 2}).eval()
        load_weights(name, ours, path)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4)


def test_weights_from_the_offline_cache_a_file_and_a_json_map(offline_cache, tmp_path):
    state = entry_state()
    x = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8)
    cached = build_named_encoder("vit-test")
    assert Path(cached.weights_file).is_relative_to(offline_cache)
    direct = build_network("vit-test").eval()
    direct.load_state_dict(state)
    with torch.no_grad():
        want = direct(cached.preprocess(x))
        torch.testing.assert_close(cached(x), want)
        assert cached(x).shape == (3, 96)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"model": state}, tmp_path / "w.pt")  # wrapped torch file
    (tmp_path / "map.json").write_text(json.dumps({"vit-test": "w.pt"}))  # relative to the map
    signatures = {json.dumps(encoder_signature(build_named_encoder("vit-test", w), "vit-test"), sort_keys=True)
                  for w in (None, tmp_path / "w.safetensors", tmp_path / "w.pt", tmp_path / "map.json")}
    assert len(signatures) == 1  # the same weights from four places: one provenance
    sig = json.loads(signatures.pop())
    assert sig["arch"] == "vit-test" and sig["input"]["input_size"] == 224 and sig["input"]["mean"] == [0.5, 0.5, 0.5]
    rand = build_named_encoder("vit-test", "random")
    assert encoder_signature(rand, "vit-test")["weights_sha"] != sig["weights_sha"]
    encs = build_scale_encoders("vit-test", 3, None)
    assert encs[0] is encs[1] is encs[2]  # one network shared by the scales


def test_missing_gated_and_mismatched_models_stop_with_one_line(offline_cache, tmp_path, monkeypatch):
    with pytest.raises(BundleInputError) as err:
        build_named_encoder("uni")  # offline, not cached
    msg = str(err.value)
    assert "offline" in msg and "not in this Hugging Face cache" in msg and "hf download MahmoodLab/UNI" in msg and "\n" not in msg
    (tmp_path / "map.json").write_text(json.dumps({"virchow": "/x.bin"}))
    with pytest.raises(BundleInputError, match="has no entry for encoder 'uni'"):
        build_named_encoder("uni", tmp_path / "map.json")
    torch.save(build_network("vit-test").state_dict(), tmp_path / "other.pt")
    with pytest.raises(BundleInputError, match="is not a transformers vit checkpoint of 'phikon'"):
        build_named_encoder("phikon", tmp_path / "other.pt")  # a transformers layout expected
    with pytest.raises(BundleInputError) as err:
        build_named_encoder("uni", tmp_path / "other.pt")  # another network's checkpoint
    assert "weights do not match" in str(err.value) and "'cls_token (1, 1, 48) vs (1, 1, 1024)'" in str(err.value)
    with pytest.raises(BundleInputError, match="SimSiam pretraining builds a built-in ResNet"):
        from scripts.features.encoders import build_backbone

        build_backbone("uni")

    from hub_server import fake_hub

    with fake_hub() as endpoint:  # answers as the hub does: MahmoodLab/UNI gated, every other repository missing
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with pytest.raises(BundleInputError) as err:
            build_named_encoder("uni")
        assert "gated" in str(err.value) and "request access at https://huggingface.co/MahmoodLab/UNI" in str(err.value)
        with pytest.raises(BundleInputError, match="not found on the Hugging Face hub"):
            build_named_encoder("virchow")


def _cause(err: BaseException) -> BaseException | None:
    """The BundleInputError behind a config evaluation's RuntimeError (the command line prints it as one line)."""
    while err is not None and not isinstance(err, BundleInputError):
        err = err.__cause__
    return err


@pytest.mark.slow
def test_a_named_encoder_runs_the_pipeline_offline(offline_cache, tiny_demo, tmp_path):
    """Acceptance of issue 29 in one run: `--encoder_arch vit-test` (weights from the offline hub cache) with Reinhard
    stain normalisation prepares, extracts, trains, infers and exports. The checkpoint records both; inference refuses
    other weights or another stain step; the Deploy repository's encoder (TorchScript, uint8 in) carries the stain
    step and gives the bundle's features."""
    import csv

    from conftest import run_bundle
    from scripts.checkpoint.contract import read_file
    from scripts.checkpoint.trained import TrainedModel
    from scripts.deploy.runtime import DeployModels
    from scripts.features.device_preprocessing import with_preprocessing

    data = dict(dataset_dir=str(tiny_demo.parent), output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"))
    run_bundle("train.yaml", max_epochs=1, val_fraction=0.5, encoder_arch="vit-test", stain_normalization="reinhard", **data)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["input_mean"].shape == (96,)  # class + mean patch token of the 48-d test ViT
    contract = read_file(tmp_path / "models" / "model.pt")
    assert contract["encoder_arch"] == "vit-test" and contract["encoders"][0]["arch"] == "vit-test"
    assert contract["stain_normalization"] == "reinhard" and contract["preprocessing_args"]["stain"] == "reinhard"
    assert len(contract["preprocessing_args"]["stain_target"]["target_mean"]) == 3  # the full target is recorded
    slide = str(tiny_demo.parent / "slides" / "demo-p001-s0.tif")
    run_bundle("inference.yaml", input=slide, num_bags=3, **data)  # encoder and stain come from the checkpoint
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["probability"]) <= 1.0
    assert (tmp_path / "out" / "demo-p001-s0" / "attention_20x.png").is_file()
    run_bundle("deploy.yaml", deploy_dir=str(tmp_path / "deploy"), num_bags=3, ckpt_dir=str(tmp_path / "models"))
    models = DeployModels(tmp_path / "deploy")
    enc = models.settings["contract"]["encoders"][0]
    assert enc["arch"] == "vit-test" and enc["input"]["input_size"] == 224 and enc["input"]["resize_mode"] == "bicubic"
    assert {e.stain_method for e in models.encoders} == {"reinhard"}
    trained = TrainedModel(tmp_path / "models" / "model.pt")
    eager = with_preprocessing(trained.encoders(), trained.preprocessing())[0]  # as extraction runs it
    x = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(models.encoders[0].stain(x), eager.stain(x))  # the same stain code, bit for bit
        torch.testing.assert_close(models.encoders[0](x), eager(x), rtol=1e-5, atol=1e-5)
    for override, words in (({"encoder_weights": "random"}, "encoder"), ({"stain_normalization": "macenko"}, "stain_normalization = reinhard")):
        with pytest.raises(RuntimeError) as err:  # refused by the contract, in one line on the command line
            run_bundle("inference.yaml", input=slide, num_bags=3, **{**data, "output_dir": str(tmp_path / "out2"), **override})
        assert _cause(err.value) is not None and words in str(_cause(err.value)), err.value


def test_docs_list_the_registry():
    from conftest import ROOT
    from scripts.features.foundation import registry_table

    assert registry_table() in (ROOT / "docs" / "encoders.md").read_text()  # regenerate the table when the registry changes
