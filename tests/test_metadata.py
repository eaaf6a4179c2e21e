"""configs/metadata.json is valid against the shipped MONAI schema and in step with CHANGELOG.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys

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


def test_verify_metadata_command_offline(meta_schema, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(META), "--filepath", str(meta_schema)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0 and "verified with no error" in r.stdout + r.stderr


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
