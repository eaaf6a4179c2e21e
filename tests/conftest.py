"""Shared fixtures: generated pyramidal slides, the real Aperio slides, a tiny demo cohort."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.data.demo import DemoParams, generate_demo  # noqa: E402
from scripts.wsi.pyramid import write_pyramid  # noqa: E402

# Real slides and the bundle metadata schema, kept in tests/data (SOURCE.md there); CSMIL_TEST_DATA overrides the folder.
TEST_DATA = Path(os.environ.get("CSMIL_TEST_DATA", ROOT / "tests" / "data"))
SCHEMA = TEST_DATA / "meta_schema_20240725.json"


#: the longest modules (a protocol each, or several torchrun runs), started first so that pytest-xdist's two workers
#: (pytest.ini: -n 2 --dist loadfile) share out the rest around them instead of one of them running last, alone
LONGEST_FIRST = ("test_fusion_colocation.py", "test_zoo_workflows.py", "test_cohort_scale.py", "test_config_layer.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order inside a module is kept


def pytest_sessionfinish(session, exitstatus):
    """A run that collected no test must fail, not pass silently (pytest exit 5)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    """A free TCP port on localhost (torchrun rendezvous in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bundle(config: str | list[str], run_id: str = "run", **overrides):
    """A bundle command in this process, as ``python -m monai.bundle run <run_id> --config_file <config> --<id> <value>``
    runs it (MONAI's ConfigWorkflow: initialize, run, finalize) without the ~8 s of imports of a new process; use a
    subprocess where the command line itself (one-line errors, exit codes, argv checks) is under test."""
    from monai.bundle import ConfigWorkflow

    files = [str(ROOT / "configs" / c) for c in ([config] if isinstance(config, str) else config)]
    w = ConfigWorkflow(config_file=files if len(files) > 1 else files[0], run_id=run_id, meta_file=str(ROOT / "configs" / "metadata.json"),
                       logging_file=False,  # keep pytest's log capture (configs/logging.conf would replace the root handlers)
                       **{"bundle_root": str(ROOT), "progress": False, **overrides})
    w.initialize()
    result = w.run()
    w.finalize()
    return result


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: tests/data is part of the repository (or set CSMIL_TEST_DATA to a copy)")
    return path


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """Real Aperio SVS, 2220x2967, single level, mpp 0.499."""
    return _require(TEST_DATA / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def tcga_svs() -> Path:
    """Real Aperio slide with two levels and no mpp in its metadata."""
    return _require(TEST_DATA / "TCGA-CR-7395-01A-01-TS1.svs")


@pytest.fixture(scope="session")
def meta_schema() -> Path:
    return _require(SCHEMA)


@pytest.fixture(scope="session")
def textured_image() -> np.ndarray:
    """2048x2048 RGB level-0 image with structure at every scale (smooth gradient + fine checker)."""
    yy, xx = np.mgrid[0:2048, 0:2048]
    r = (xx * 255 // 2047).astype(np.uint8)
    g = (yy * 255 // 2047).astype(np.uint8)
    b = (((xx // 3 + yy // 5) % 2) * 200 + 20).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)


@pytest.fixture(scope="session")
def pyramid_1_4_16(tmp_path_factory, textured_image) -> Path:
    """Lossless pyramid with only 1x/4x/16x levels at 0.5 µm/px (no 10x level)."""
    path = tmp_path_factory.mktemp("pyr") / "levels_1_4_16.tif"
    return write_pyramid(path, textured_image, mpp=0.5, downsamples=(1, 4, 16), compression="deflate")


@pytest.fixture(scope="session")
def pyramid_1_2_4(tmp_path_factory, textured_image) -> Path:
    """Lossless pyramid with 1x/2x/4x levels at 0.5 µm/px (every scale has its level)."""
    path = tmp_path_factory.mktemp("pyr") / "levels_1_2_4.tif"
    return write_pyramid(path, textured_image, mpp=0.5, downsamples=(1, 2, 4), compression="deflate")


TINY_DEMO = DemoParams(num_patients=4, size=1536, seed=1)

#: the MIL model the bundle trains by default (configs/train.yaml ``mil_model``)
DEFAULT_MIL_MODEL = ConfigParser(yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())).get_parsed_content("mil_model")


def default_network(in_features: int = 128, **kw):
    """The default MIL network as configs/train.yaml builds it (128 = the demo's ``tiny`` encoder)."""
    from scripts.mil.registry import build_model

    return build_model(DEFAULT_MIL_MODEL, in_features=in_features, **kw)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """Manifest of a 4-patient demo cohort with small slides."""
    return generate_demo(tmp_path_factory.mktemp("demo"), TINY_DEMO, progress=False)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A CS-MIL model trained for 2 epochs on the tiny demo cohort (tiny encoder, 128-d features):
    ``<root>/models/model.pt``, the cohort in ``<root>/demo``, outputs in ``<root>/out``."""
    import subprocess

    root = tmp_path_factory.mktemp("trained")
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml", "--dataset_dir",
         str(root / "demo"), "--output_dir", str(root / "out"), "--ckpt_dir", str(root / "models"), "--demo_num_patients",
         str(TINY_DEMO.num_patients), "--demo_slide_size", str(TINY_DEMO.size), "--max_epochs", "2", "--val_fraction", "0.5",
         "--progress", "False"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return root
