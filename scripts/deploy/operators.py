"""MONAI Deploy App SDK operators of the CS-MIL application.

slide loader -> multi-scale tiler and encoders -> CS-MIL (TorchScript) -> writer. Each operator is a thin
shell around the same functions the bundle's stages use (tiling, feature store, clustering, bag
prediction, map export), so the Deploy app and ``run inference`` give the same numbers for the same model.
Slides travel between operators as lists (one message for the whole input), which keeps the graph a
single pass.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from monai.bundle import ConfigParser
from monai.deploy.core import Fragment, Operator, OperatorSpec

from scripts.data.manifest import SlideRecord
from scripts.deploy.runtime import DeployModels
from scripts.features.clustering import cluster_cohort
from scripts.features.extraction import extract_cohort
from scripts.inference.inputs import input_records
from scripts.inference.outputs import add_slide_outputs, write_cohort_outputs
from scripts.inference.workflow import SlideInferer
from scripts.interrupts import StopRequested, check_stop
from scripts.wsi.slide import SlideReader
from scripts.wsi.tiling import prepare_slide

logger = logging.getLogger(__name__)


@contextmanager
def stoppable(name: str) -> Iterator[None]:
    """An operator's ``compute``: a stop signal (:func:`scripts.interrupts.check_stop`, polled between feature
    batches and between slides) ends it without emitting, so nothing downstream runs on part of the input;
    Holoscan, which saw the same signal, stops the graph and the app exits 130 / 143."""
    try:
        check_stop()
        yield
    except StopRequested as stop:
        logger.warning("%s: stopped by %s; finished work is cached: rerun the same command to resume", name,
                       signal.Signals(stop.signum).name)


class SlideLoaderOperator(Operator):
    """Input (a slide file, a folder of slides, a folder with ``manifest.csv`` or a manifest CSV) -> the
    slides' records; every slide is opened once here so a bad file fails before any work."""

    def __init__(self, fragment: Fragment, *args, input_path: str | Path, backend: str = "openslide",
                 mpp: float | None = None, **kwargs) -> None:
        self.input_path, self.backend, self.mpp = Path(input_path), backend, mpp
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("slides")

    def compute(self, op_input, op_output, context) -> None:
        with stoppable(self.name):
            op_output.emit(self.load(), "slides")

    def load(self) -> list[SlideRecord]:
        """Records of the input's slides, each checked to open with a known µm per px."""
        return load_records(self.input_path, self.backend, self.mpp)


def load_records(input_path: str | Path, backend: str = "openslide", mpp: float | None = None) -> list[SlideRecord]:
    """Records of the input's slides (a slide, a folder of slides or a manifest), each checked to open with a
    known µm per px; also the app's check before its graph starts (:func:`scripts.deploy.main.main`)."""
    records = input_records(input_path, mpp)
    for r in records:
        with SlideReader(r.path, backend=backend, mpp=r.mpp):
            pass
    logger.info("%d slide(s) from %s", len(records), input_path)
    return records


class MultiScaleEncoderOperator(Operator):
    """Slides -> feature-store entries with clusters: tissue mask and co-centred patch grid, the patches of
    every scale through that scale's TorchScript encoder, K-means phenotype clusters (cached in ``work_dir``)."""

    def __init__(self, fragment: Fragment, *args, models: DeployModels, work_dir: str | Path,
                 device: str | torch.device = "cpu", num_workers: int = 0, **kwargs) -> None:
        self.models, self.work_dir, self.device, self.num_workers = models, Path(work_dir), device, num_workers
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("slides")
        spec.output("entries")

    def compute(self, op_input, op_output, context) -> None:
        with stoppable(self.name):
            op_output.emit(self.encode(op_input.receive("slides")), "entries")

    def encode(self, records: Sequence[SlideRecord]) -> list:
        """Feature entries (``scripts.features.store.FeatureEntry``) of ``records``, in order."""
        s = self.models.settings
        tiles = []
        for r in records:
            check_stop()
            tiles.append(prepare_slide(r.slide_id, r.path, self.work_dir, self.models.tiling, r.mpp))
        transform = ConfigParser({"preprocessing": s["preprocessing"]}).get_parsed_content("preprocessing")
        entries = extract_cohort(records, tiles, self.work_dir / "features", self.models.encoders, s["encoder_arch"], transform,
                                 s["scale_keys"], preprocessing=s["preprocessing_signature"], batch_size=s["feature_batch_size"],
                                 num_workers=self.num_workers, device=self.device, progress=False)
        return cluster_cohort(entries, k=s["num_clusters"], scale_index=s["cluster_scale_index"], seed=s["seed"], progress=False)


class CSMILInferenceOperator(Operator):
    """Entries -> (entry, prediction) pairs: the TorchScript CS-MIL model's mean class probabilities (survival: risk)
    over ``num_bags`` seeded random bags and the attention of every patch at every scale."""

    def __init__(self, fragment: Fragment, *args, models: DeployModels, device: str | torch.device = "cpu", **kwargs) -> None:
        self.models, self.device = models, device
        s = models.settings
        self.inferer = SlideInferer(s["num_clusters"], s["bag_per_cluster"], s["num_bags"], s["bag_replacement"], s["seed"], device,
                                    task=s.get("task", "classification"), map_class=s.get("map_class"))
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("entries")
        spec.output("predictions")

    def compute(self, op_input, op_output, context) -> None:
        with stoppable(self.name):
            op_output.emit(self.predict(op_input.receive("entries")), "predictions")

    def predict(self, entries: Sequence) -> list[tuple]:
        network = self.models.network.to(self.device)
        out = []
        for e in entries:  # one slide at a time (each slide's bags are seeded by its id: the same numbers)
            check_stop()
            out.append((e, self.inferer([e], network)[0]))
        return out


class AttentionMapWriterOperator(Operator):
    """(entry, prediction) pairs -> ``<output>/predictions.csv`` and per slide ``prediction.json``, per-scale
    attention PNG overlays, the scale composite, QuPath GeoJSON and pyramidal TIFF heatmaps."""

    def __init__(self, fragment: Fragment, *args, models: DeployModels, output_dir: str | Path, **kwargs) -> None:
        self.models, self.output_dir = models, Path(output_dir)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("predictions")

    def compute(self, op_input, op_output, context) -> None:
        with stoppable(self.name):
            self.write(op_input.receive("predictions"))

    def write(self, predictions: Sequence[tuple]) -> list[dict]:
        s = self.models.settings
        rows: list[dict] = []
        try:
            for entry, pred in predictions:
                check_stop()
                add_slide_outputs(rows, entry, pred, self.output_dir, s["scales_mpp"], threshold=s["threshold"], masks=None,
                                  heatmap_mpp=s["heatmap_mpp"], overlay_mpp=s["overlay_mpp"], task=s.get("task", "classification"),
                                  class_names=s.get("class_names", []))
        finally:  # stopped part-way: predictions.csv lists exactly the slides written
            write_cohort_outputs(rows, self.output_dir, s["scales_mpp"])
        for r in rows:
            if "risk" in r:
                logger.info("%s: risk %.4f", r["slide_id"], r["risk"])
            elif "probability" in r:
                logger.info("%s: probability %.4f -> label %d", r["slide_id"], r["probability"], r["label"])
            else:
                logger.info("%s: class %s", r["slide_id"], r["predicted_class"])
        return rows
