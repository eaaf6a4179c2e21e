"""Offline equivalents of the MONAI Model Zoo checks: network in/out shapes, TorchScript export, bundle
properties (metadata validation is in test_metadata.py)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import ROOT, TINY_DEMO, default_network
from scripts.mil.networks import CSMIL


def test_verify_net_in_out_passes_and_catches_a_wrong_shape(tmp_path):
    """The Zoo's data-shape check (ci/verify_bundle.py calls MONAI's verify_net_in_out as a function, as here) on
    configs/inference.yaml's network_def: without a checkpoint (a fresh clone) it is train.yaml's default model."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(ROOT / "configs" / "metadata.json"),
                      config_file=str(ROOT / "configs" / "inference.yaml"), bundle_root=str(ROOT), ckpt_dir=str(tmp_path))
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = 2  # network has 3 scales
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(Exception):
        verify_net_in_out(net_id="network_def", meta_file=str(bad), config_file=str(ROOT / "configs" / "inference.yaml"),
                          bundle_root=str(ROOT), ckpt_dir=str(tmp_path))


def test_ckpt_export_to_torchscript_matches_eager(tmp_path):
    from monai.bundle import ckpt_export

    torch.manual_seed(0)
    net = default_network().eval()  # the demo encoder's feature size (128), train.yaml's default model
    net.set_input_stats(torch.randn(128), torch.rand(128) + 0.5)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=str(ROOT / "configs" / "metadata.json"), config_file=str(ROOT / "configs" / "inference.yaml"),
                bundle_root=str(ROOT), ckpt_dir=str(tmp_path))
    ts = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(2, 3, 64, 128)
    mask = torch.rand(2, 64) > 0.25
    torch.testing.assert_close(ts(x, mask), net(x, mask))
    torch.testing.assert_close(ts(x), net(x))


@pytest.mark.parametrize("kw", [{}, {"pooling": "flat", "scale_softmax": False}, {"share_scale_kernel": False},
                                {"share_instance_encoder": False}])
def test_every_variant_is_scriptable(kw):
    net = CSMIL(in_features=16, num_clusters=4, **kw).eval()
    ts = torch.jit.script(net)
    x, mask = torch.randn(1, 3, 8, 16), torch.ones(1, 8, dtype=torch.bool)
    torch.testing.assert_close(ts(x, mask), net(x, mask))


def _train_properties(config, tmp_path, monkeypatch, tiny_demo):
    monkeypatch.chdir(tmp_path)  # the bundle runs from any folder given bundle_root
    w = ConfigWorkflow(config_file=str(config), workflow_type="train", meta_file=str(ROOT / "configs" / "metadata.json"), bundle_root=str(ROOT),
                       logging_file=str(ROOT / "configs" / "logging.conf"), dataset_dir=str(tiny_demo.parent),
                       output_dir=str(tmp_path / "out"), demo_num_patients=TINY_DEMO.num_patients,
                       demo_slide_size=TINY_DEMO.size, progress=False, val_fraction=0.5)
    w.initialize()
    return w.check_properties()


def test_train_config_has_the_zoo_properties(tmp_path, monkeypatch, tiny_demo):
    assert _train_properties(ROOT / "configs" / "train.yaml", tmp_path, monkeypatch, tiny_demo) == []


def test_missing_train_property_is_reported(tmp_path, monkeypatch, tiny_demo):
    text = (ROOT / "configs" / "train.yaml").read_text()
    broken = text.replace('    inferer: "@train#inferer"\n', "").replace("  inferer:\n    _target_: SimpleInferer\n", "")
    assert broken != text
    cfg = tmp_path / "train_broken.yaml"
    cfg.write_text(broken)
    try:
        missing = _train_properties(cfg, tmp_path, monkeypatch, tiny_demo)
    except KeyError as err:  # MONAI raises for a missing required property
        missing = [str(err)]
    assert any("train_inferer" in m or "train#inferer" in m for m in missing), missing


def test_inference_config_has_the_zoo_infer_properties(tmp_path, monkeypatch, tiny_demo):
    monkeypatch.chdir(ROOT)
    ckpt = tmp_path / "model.pt"
    torch.save(default_network().state_dict(), ckpt)  # a fresh clone has no trained model
    w = ConfigWorkflow(config_file=str(ROOT / "configs" / "inference.yaml"), workflow_type="infer",
                       meta_file=str(ROOT / "configs" / "metadata.json"), logging_file=str(ROOT / "configs" / "logging.conf"),
                       dataset_dir=str(tiny_demo.parent), output_dir=str(tmp_path / "out"), progress=False, ckpt_path=str(ckpt))
    w.initialize()
    assert w.check_properties() == []
    text = (ROOT / "configs" / "inference.yaml").read_text()
    broken = tmp_path / "inference_broken.yaml"
    broken.write_text(text.replace("evaluator:\n  _target_: SupervisedEvaluator", "evaluator_renamed:\n  _target_: SupervisedEvaluator"))
    w = ConfigWorkflow(config_file=str(broken), workflow_type="infer", meta_file=str(ROOT / "configs" / "metadata.json"),
                       logging_file=str(ROOT / "configs" / "logging.conf"), dataset_dir=str(tiny_demo.parent),
                       output_dir=str(tmp_path / "out"), progress=False, ckpt_path=str(ckpt))
    with pytest.raises(KeyError, match="evaluator"):  # MONAI refuses a workflow without a required property
        w.initialize()
        missing = w.check_properties() or []
        if "evaluator" in missing:
            raise KeyError("evaluator")


def test_large_files_lists_the_uncommitted_weights():
    import yaml

    entries = yaml.safe_load((ROOT / "large_files.yml").read_text())["large_files"]
    paths = {e["path"] for e in entries}
    assert {"models/model.pt", "models/model.ts"} <= paths
    from scripts.deploy.export import CSMIL_DIR, encoder_dirs

    assert {f"models/deploy/{d}/model.ts" for d in [CSMIL_DIR, *encoder_dirs([0.5, 1.0, 2.0])]} <= paths
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/models/*.pt" in ignored and "/models/*.ts" in ignored  # listed because not committed
    assert all(set(e) == {"path", "url", "hash_val", "hash_type"} for e in entries)
