"""configs/metadata.json is valid against the shipped MONAI schema and in step with CHANGELOG.md."""

from __future__ import annotations

import json
import re

import jsonschema

from conftest import ROOT

META = ROOT / "configs" / "metadata.json"


def test_metadata_valid_against_schema(meta_schema):
    meta = json.loads(META.read_text())
    schema = json.loads(meta_schema.read_text())
    errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(meta), key=str)
    assert not errors, [e.message for e in errors]


def test_broken_metadata_is_caught(meta_schema):
    meta = json.loads(META.read_text())
    del meta["network_data_format"]
    schema = json.loads(meta_schema.read_text())
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(meta))


def test_verify_metadata_offline(meta_schema, tmp_path):
    """MONAI's verify_metadata (the Zoo calls the function; `python -m monai.bundle verify_metadata` is the same)."""
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(META), filepath=str(meta_schema))
    bad = tmp_path / "metadata.json"
    meta = json.loads(META.read_text())
    del meta["network_data_format"]
    bad.write_text(json.dumps(meta))
    import pytest

    with pytest.raises(Exception):
        verify_metadata(meta_file=str(bad), filepath=str(meta_schema))


def test_metadata_describes_the_default_model_with_measured_metrics():
    """The model `run training` trains (train.yaml's mil_model) is the one the metadata names, and eval_metrics are
    the demo protocol's numbers of docs/evaluation.md's sample report, not placeholders."""
    import yaml

    meta = json.loads(META.read_text())
    default = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())["mil_model"]
    assert default in meta["description"] and default.upper() in meta["name"].upper()
    metrics = meta["eval_metrics"]
    assert metrics and all(k.startswith(("demo40_protocol_", "demo20_protocol_")) for k in metrics) and all(0 < v <= 1 for v in metrics.values())
    sample = (ROOT / "docs" / "evaluation.md").read_text().split("## Table 1")[1].split("##")[0]
    row = [line for line in sample.splitlines() if line.startswith(f"| {default} |")][0]
    assert f"{metrics['demo40_protocol_mean_auc']:.4f}" in row and f"{metrics['demo40_protocol_combined_auc']:.4f}" in row


def test_version_and_changelog_in_step():
    meta = json.loads(META.read_text())
    assert meta["version"] in meta["changelog"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    top = re.search(r"^## (\d+\.\d+\.\d+)", changelog, re.M)
    assert top and top.group(1) == meta["version"]
    import scripts

    assert scripts.__version__ == meta["version"]


def test_monai_reads_our_required_packages_unchanged():
    """MONAI 1.6 renames 'optional_packages_version' to 'required_packages_version' when it reads metadata,
    which would silently replace the real requirements: the key must not be used."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(META))
    required = parser.get("_meta_")["required_packages_version"]
    assert "pytorch-ignite" in required and "openslide-python" in required
