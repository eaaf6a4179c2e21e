"""Stage functions called from the configs, and the chaining between stage configs.

Each stage config (``configs/<stage>.yaml``) defines a key named after the stage that returns its
results. A stage that needs an earlier one calls :func:`run_stage`, which parses the earlier stage's
config with the shared ids of ``configs/common.yaml`` (``stage_overrides``) and evaluates it; every
stage is cached, so this only computes what is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from monai.bundle import ConfigParser
from tqdm import tqdm

from scripts.data.demo import DemoParams, generate_demo
from scripts.data.manifest import SlideRecord, read_manifest
from scripts.errors import BundleInputError
from scripts.wsi.tiling import TilingParams, prepare_slide

logger = logging.getLogger(__name__)


def run_stage(bundle_root: str | Path, stage: str, overrides: Mapping[str, Any]) -> Any:
    """Parse ``configs/<stage>.yaml`` with ``overrides`` and return the value of its ``<stage>`` key."""
    config = Path(bundle_root) / "configs" / f"{stage}.yaml"
    if not config.is_file():
        raise BundleInputError(config, f"stage config for '{stage}' not found", "run from the bundle root or pass --bundle_root")
    parser = ConfigParser()
    parser.read_config(str(config))
    for key, value in overrides.items():
        parser[key] = value
    logger.info("stage '%s' (%s)", stage, config)
    return parser.get_parsed_content(stage, lazy=True)


def cohort_records(
    manifest: str | Path, label_map: Mapping[str, int] | None = None, demo: DemoParams | None = None, progress: bool = True,
    input: str | Path | None = None, mpp: float | None = None,
) -> list[SlideRecord]:
    """The slides a stage works on.

    ``input`` (a slide, a folder of slides or a manifest; labels optional) replaces the cohort manifest when
    given. Otherwise the manifest is read, after building the demo cohort there when ``demo`` is given and the
    manifest is missing. ``mpp`` fills in the level-0 resolution of slides that have none.
    """
    from scripts.inference.inputs import input_records

    if input is not None:
        return input_records(input, mpp, label_map)
    manifest = Path(manifest)
    if demo is not None and not manifest.is_file():
        logger.info("no manifest at %s: generating the demo cohort there", manifest)
        generate_demo(manifest.parent, demo, progress=progress)
    records = read_manifest(manifest, label_map)
    if mpp is not None:
        records = [r if r.mpp is not None else SlideRecord(r.slide_id, r.patient_id, r.path, r.label, float(mpp), r.split) for r in records]
    return records


def prepare_cohort(
    records: Sequence[SlideRecord], cache_dir: str | Path, tiling: TilingParams, progress: bool = True,
    on_error: str = "raise", output_dir: str | Path | None = None,
) -> dict[str, list]:
    """Tile every slide (cached). Returns ``{"records": [...], "tiles": [entry dirs]}`` of the slides that
    could be tiled (with ``on_error='skip'`` the others go to ``failures.csv``, see
    :mod:`scripts.workflows.failures`)."""
    from scripts.workflows.failures import check_policy, guarded

    check_policy(on_error)
    kept, tiles = [], []
    for r in tqdm(records, desc="prepare slides", disable=not progress):
        t = guarded(on_error, "prepare", r.slide_id, output_dir, prepare_slide, r.slide_id, r.path, cache_dir, tiling, mpp=r.mpp)
        if t is not None:
            kept.append(r)
            tiles.append(t)
    if not kept:
        raise BundleInputError(None, "no slide of the cohort could be prepared", "see failures.csv in the output folder")
    return {"records": kept, "tiles": tiles}
