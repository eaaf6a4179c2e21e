"""Inference as a MONAI evaluator workflow (the Model Zoo's InferProperties: ``dataset``, ``inferer``,
``evaluator``): one iteration per slide; the inferer predicts the slide (mean probability over R random bags)
and the attention of every patch; :class:`SlideOutputWriter` writes the maps and, at the end, the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer

from scripts.data.manifest import SlideRecord
from scripts.features.store import FeatureEntry
from scripts.inference.outputs import add_slide_outputs, masks_dir, write_cohort_outputs
from scripts.inference.predict import SlidePrediction, predict_entry


def entry_items(entries: Sequence[FeatureEntry]) -> list[dict]:
    """Dataset items, one per slide: its store entry and the input manifest's fields (label -1: none given; a survival
    manifest's time and event, -1 when not given)."""
    return [{"entry": str(e.path), "label": -1 if e.label is None else e.label, "slide_id": e.slide_id,
             "patient_id": e.patient_id or e.slide_id, "image": str(e.record.path) if e.record else "",
             "time": -1.0 if e.record is None or e.record.time is None else float(e.record.time),
             "event": -1 if e.record is None or e.record.event is None else int(e.record.event)} for e in entries]


def _opt(v: Any, kind: type) -> Any:
    """A collated optional value (-1: none given) as ``kind`` or None."""
    v = float(v) if not isinstance(v, torch.Tensor) else float(v.reshape(-1)[0])
    return None if v < 0 else kind(v)


class PrepareEntryBatch:
    """``prepare_batch``: (list of :class:`FeatureEntry` with their records, labels)."""

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs: Any):
        cols = {k: batchdata[k] for k in ("entry", "slide_id", "patient_id", "image")}
        if isinstance(cols["entry"], str):
            cols = {k: [v] for k, v in cols.items()}
        labels = torch.as_tensor(batchdata["label"]).reshape(-1)
        times = batchdata.get("time", [None] * len(labels))
        events = batchdata.get("event", [None] * len(labels))
        times, events = ([times], [events]) if not isinstance(times, (list, tuple, torch.Tensor)) else (times, events)
        entries = [FeatureEntry(Path(p), SlideRecord(s, pid, img, int(lab), time=_opt(t, float), event=_opt(e, int)))
                   for p, s, pid, img, lab, t, e in zip(cols["entry"], cols["slide_id"], cols["patient_id"], cols["image"], labels,
                                                        times, events)]
        return entries, labels


class SlideInferer(Inferer):
    """Predict slides from their feature entries: returns one :class:`SlidePrediction` per entry."""

    def __init__(self, num_clusters: int, per_cluster: int, num_bags: int = 100, replacement: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", task: str = "classification", map_class: int | None = None) -> None:
        self.num_clusters, self.per_cluster, self.num_bags = num_clusters, per_cluster, num_bags
        self.replacement, self.seed, self.device = replacement, seed, device
        self.task, self.map_class = task, map_class

    def __call__(self, inputs: Sequence[FeatureEntry], network: torch.nn.Module, *args: Any, **kwargs: Any) -> list[SlidePrediction]:
        return [predict_entry(network, e, self.num_clusters, self.per_cluster, self.num_bags, self.replacement, self.seed, self.device,
                              task=self.task, map_class=self.map_class)
                for e in inputs]


class SlideOutputWriter:
    """Evaluator handler: per slide, its folder of maps and ``prediction.json`` (complete or absent) and
    ``predictions.csv`` with the slides so far; when the run completes, ``localisation.json`` (rows also kept in
    ``self.rows``)."""

    def __init__(self, output_dir: str | Path, scales_mpp: Sequence[float], threshold: float = 0.5, input_path: str | None = None,
                 dataset_dir: str | None = None, lesion_mask_mpp: float = 8.0, heatmap_mpp: float = 8.0, overlay_mpp: float = 4.0,
                 task: str = "classification", class_names: Sequence[str] = ()) -> None:
        self.out = Path(output_dir)
        self.scales_mpp = list(scales_mpp)
        self.kw = dict(threshold=threshold, masks=masks_dir(input_path, dataset_dir), lesion_mask_mpp=lesion_mask_mpp,
                       heatmap_mpp=heatmap_mpp, overlay_mpp=overlay_mpp, task=task, class_names=list(class_names))
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._slide)
        engine.add_event_handler(Events.COMPLETED, lambda _: write_cohort_outputs(self.rows, self.out, self.scales_mpp))

    def _slide(self, engine: Engine) -> None:
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        for entry, pred in zip(out["image"], out["pred"]):
            add_slide_outputs(self.rows, entry, pred, self.out, self.scales_mpp, **self.kw)
