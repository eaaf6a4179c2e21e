"""Stage functions of the training config (``configs/train.yaml``).

The config chains the stages by reference: ``read_records`` -> ``tiles`` (:class:`LazyCohort` over
:func:`prepare_cohort`) -> ``features`` (:func:`scripts.features.extraction.extract_cohort`) -> ``entries``
(:func:`scripts.features.clustering.cluster_cohort`) -> ``datalist`` (:mod:`scripts.data.datalist`). Every stage is
cached on disk, so a command computes only what is missing; the entries carry the manifest's rows.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

from tqdm import tqdm

from scripts.data.demo import DemoParams, generate_demo
from scripts.data.manifest import SlideRecord, read_manifest
from scripts.errors import BundleInputError
from scripts.wsi.tiling import TilingParams, prepare_slide

logger = logging.getLogger(__name__)


def pipeline_entries(records: Sequence[SlideRecord], prepare: Callable, extract: Callable, cluster: Callable) -> list:
    """Clustered feature-store entries of ``records`` through the config's stage callables (e.g. an external
    test manifest in ``run evaluate``): ``cluster(extract(**prepare(records)))``."""
    tiles = prepare(records)
    return cluster(extract(tiles["records"], tiles["tiles"]))


def cohort_records(
    manifest: str | Path, label_map: Mapping[str, int] | None = None, demo: DemoParams | None = None, progress: bool = True,
    mpp: float | None = None, task: str = "classification",
) -> list[SlideRecord]:
    """The slides of the cohort manifest (training and the protocol; inference reads its ``--input`` with
    :func:`scripts.inference.inputs.input_records`), after building the demo cohort there when ``demo`` is given
    and the manifest is missing. ``mpp`` fills in the level-0 resolution of slides that have none.
    """
    manifest = Path(manifest)
    if demo is not None and not manifest.is_file():
        logger.info("no manifest at %s: generating the demo cohort there", manifest)
        generate_demo(manifest.parent, demo, progress=progress)
    records = read_manifest(manifest, label_map, task=task)
    if mpp is not None:
        records = [r if r.mpp is not None else dataclasses.replace(r, mpp=float(mpp)) for r in records]
    return records


class LazyCohort:
    """This command's slides and their tile folders, read (the demo generated) and tiled on first use, once.

    MONAI resolves every reference of an expression before evaluating it, so an id holding the cohort's data
    would read and tile the cohort in every command that resolves something depending on it, needed or not:
    ``run export`` tiled the whole cohort (and generated the demo) to export encoders that use no slide, and
    inference tiled its input before checking the checkpoint's encoders. Holding the two steps as callables
    defers the work to the first :meth:`tiles` call.
    """

    def __init__(self, read_records: Callable[[], Sequence[SlideRecord]], prepare: Callable[[Sequence[SlideRecord]], dict]) -> None:
        self._read_records, self._prepare = read_records, prepare
        self._tiles: dict | None = None

    def tiles(self) -> dict[str, list]:
        """``{"records": [...], "tiles": [entry dirs]}`` of the slides that could be tiled (see :func:`prepare_cohort`)."""
        if self._tiles is None:
            self._tiles = self._prepare(self._read_records())
        return self._tiles


def pretrain_cohort(cohort: LazyCohort, **kwargs) -> list:
    """SimSiam encoders per scale on the cohort's patches (:func:`scripts.features.simsiam.pretrain_scales`, whose
    other arguments ``kwargs`` are); the cohort is read and tiled only when this runs."""
    from scripts.features.simsiam import pretrain_scales

    tiles = cohort.tiles()
    return pretrain_scales(tiles["records"], tiles["tiles"], **kwargs)


def prepare_cohort(
    records: Sequence[SlideRecord], cache_dir: str | Path, tiling: TilingParams, progress: bool = True,
    on_error: str = "raise", output_dir: str | Path | None = None, mpp_force: bool = False,
) -> dict[str, list]:
    """Tile every slide (cached). Returns ``{"records": [...], "tiles": [entry dirs]}`` of the slides that
    could be tiled (with ``on_error='skip'`` the others go to ``failures.csv``, see
    :mod:`scripts.workflows.failures`)."""
    from scripts.workflows.failures import check_policy, guarded

    check_policy(on_error)
    kept, tiles = [], []
    for r in tqdm(records, desc="prepare slides", disable=not progress):
        t = guarded(on_error, "prepare", r.slide_id, output_dir, prepare_slide, r.slide_id, r.path, cache_dir, tiling, mpp=r.mpp,
                    mpp_force=mpp_force)
        if t is not None:
            kept.append(r)
            tiles.append(t)
    if not kept:
        raise BundleInputError(None, "no slide of the cohort could be prepared", "see failures.csv in the output folder")
    return {"records": kept, "tiles": tiles}
