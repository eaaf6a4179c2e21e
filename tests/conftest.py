"""Shared fixtures: generated pyramidal slides, the real Aperio slides, a tiny demo cohort."""

from __future__ import annotations

import contextlib
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


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores for torch's threads, and the bundle commands it
    starts inherit that share (OMP_NUM_THREADS, unless set already): two workers on two cores, each with two OpenMP
    threads and subprocesses of two more, would oversubscribe the CPU. The outputs do not depend on it (the golden
    demo features and model are the same with one thread or two)."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 0))
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order inside a module is kept


def pytest_sessionfinish(session, exitstatus):
    """A run that collected no test must fail, not pass silently (pytest exit 5)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block: a protocol run in the test's own process then computes what each of
    ``eval_workers = 2``'s spawned workers computes (one thread each, bit for bit), without their two interpreters'
    imports and without a third busy process beside pytest-xdist's two workers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    ``<root>/models/model.pt``, the cohort in ``<root>/demo``, outputs in ``<root>/out``. ``run training`` in this
    process (the command line is under test elsewhere; a new interpreter would add ~8 s of imports per xdist worker)."""
    root = tmp_path_factory.mktemp("trained")
    run_bundle("train.yaml", "training", dataset_dir=str(root / "demo"), output_dir=str(root / "out"), ckpt_dir=str(root / "models"),
               demo_num_patients=TINY_DEMO.num_patients, demo_slide_size=TINY_DEMO.size, max_epochs=2, val_fraction=0.5,
               log_every_iterations=3)  # 2 epochs of 2 iterations: a TensorBoard point at iteration 3 only
    return root
