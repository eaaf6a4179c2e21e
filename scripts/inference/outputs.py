"""Outputs of slide predictions: per-scale PNG overlays and composite, QuPath GeoJSON, pyramidal TIFF heatmaps,
``prediction.json`` per slide, ``predictions.csv`` and ``localisation.json`` per run, and the localisation score of
the maps against lesion masks."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from scripts.cache import atomic_dir, atomic_write_bytes, atomic_write_json
from scripts.data.ids import folder_name
from scripts.errors import writing
from scripts.features.store import FeatureEntry
from scripts.inference.predict import SlidePrediction, scale_name
from scripts.maps import export
from scripts.wsi.slide import SlideReader

logger = logging.getLogger(__name__)


def localisation_auroc(coords: np.ndarray, attention: np.ndarray, mask: np.ndarray, mask_mpp: float, slide_mpp: float) -> list[float | None]:
    """Per scale: AUROC of patch attention against 'patch centre inside the lesion mask' (None if one class)."""
    from sklearn.metrics import roc_auc_score

    f = slide_mpp / mask_mpp
    mx = np.clip((coords[:, 0] * f).astype(int), 0, mask.shape[1] - 1)
    my = np.clip((coords[:, 1] * f).astype(int), 0, mask.shape[0] - 1)
    y = mask[my, mx] > 0
    if y.all() or not y.any():
        return [None] * attention.shape[1]
    return [float(roc_auc_score(y, attention[:, s])) for s in range(attention.shape[1])]


def entry_localisation(entry: FeatureEntry, attention: np.ndarray, masks: Path | None, lesion_mask_mpp: float = 8.0) -> list[float | None] | None:
    """Per-scale localisation AUROC of ``attention`` [N, S] against ``masks/<folder name of the slide id>.png`` (None without a mask)."""
    mask_file = masks / f"{folder_name(entry.slide_id)}.png" if masks else None
    if mask_file is None or not mask_file.is_file():
        return None
    slide_mpp = float(json.loads((Path(entry.meta["tiles_dir"]) / "meta.json").read_text())["mpp"])
    return localisation_auroc(entry.coords().astype(np.float64), attention, np.asarray(Image.open(mask_file)), lesion_mask_mpp, slide_mpp)


def masks_dir(input_path, dataset_dir) -> Path | None:
    if input_path is None:
        return Path(dataset_dir) / "masks"
    p = Path(input_path)
    return (p if p.is_dir() else p.parent) / "masks"


def write_slide_outputs(
    entry: FeatureEntry, pred: SlidePrediction, out: Path, scales_mpp: Sequence[float], threshold: float = 0.5,
    masks: Path | None = None, lesion_mask_mpp: float = 8.0, heatmap_mpp: float = 8.0, overlay_mpp: float = 4.0,
    task: str = "classification", class_names: Sequence[str] = (),
) -> dict:
    """Per-scale PNG overlays, scale composite, QuPath GeoJSON, pyramidal TIFF heatmaps and ``prediction.json``
    of one slide in ``out/<folder name of the slide id>/`` (:mod:`scripts.data.ids`), complete or absent; returns its ``predictions.csv`` row."""
    names = [scale_name(m) for m in scales_mpp]
    tiles_meta = json.loads((Path(entry.meta["tiles_dir"]) / "meta.json").read_text())
    slide_mpp = float(tiles_meta["mpp"])
    coords = entry.coords().astype(np.float64)
    norm = export.normalise_per_scale(pred.attention)
    patch_size = int(tiles_meta["tiling"]["patch_size"])  # as the slide was tiled (the config's patch_size)
    footprint = patch_size * min(scales_mpp) / slide_mpp  # the finest scale's patch square, level-0 px
    # the folder is complete or absent: written under a temporary name, then renamed (ids are data, not paths)
    with atomic_dir(out / folder_name(entry.slide_id), f"the maps and prediction of slide '{entry.slide_id}'", replace=True) as sdir:
        with SlideReader(tiles_meta["path"], backend=tiles_meta["tiling"]["backend"], mpp=slide_mpp, mpp_force=True) as slide:
            thumb = slide.thumbnail(overlay_mpp)
        thumb_scale = slide.size[1] / thumb.shape[1]
        heats = [export.rasterise(coords, norm[:, s], footprint, thumb.shape[:2], thumb_scale) for s in range(len(names))]
        for name, heat in zip(names, heats):
            export.save_png(sdir / f"attention_{name}.png", export.overlay(thumb, heat))
        export.save_png(sdir / "attention_scales.png", export.scale_composite(thumb, heats))
        measurements = {f"attention {n}": norm[:, s] for s, n in enumerate(names)}
        measurements.update({f"scale weight {n}": pred.scale_weights[:, s] for s, n in enumerate(names)})
        export.write_geojson(sdir / "attention.geojson", coords, footprint, measurements)
        h, w = tiles_meta["level_dims"][0]
        heat_scale = heatmap_mpp / slide_mpp
        hshape = (max(1, int(np.ceil(h / heat_scale))), max(1, int(np.ceil(w / heat_scale))))
        for s, name in enumerate(names):
            heat = export.rasterise(coords, norm[:, s], footprint, hshape, heat_scale)
            export.write_heatmap_tiff(sdir / f"attention_{name}.tif", heat, heatmap_mpp)
        row = {"slide_id": entry.slide_id, **prediction_columns(entry, pred, threshold, task, class_names),
               "num_patches": entry.num_patches, "predict_seconds": round(pred.seconds, 3)}
        aurocs = entry_localisation(entry, pred.attention, masks, lesion_mask_mpp)
        if aurocs is not None:
            row.update({f"localisation_auroc_{n}": ("" if a is None else round(a, 4)) for n, a in zip(names, aurocs)})
        shown = {} if pred.map_class is None else {"map_class": int(pred.map_class)}
        if shown and class_names:
            shown["map_class_name"] = class_names[int(pred.map_class)]
        atomic_write_json(sdir / "prediction.json", {**row, "task": task, **shown, "scales": names,
                                                      "attention_normalisation": "min-max per scale"})
        return row


def prediction_columns(entry: FeatureEntry, pred: SlidePrediction, threshold: float = 0.5, task: str = "classification",
                       class_names: Sequence[str] = ()) -> dict:
    """The prediction's columns of ``predictions.csv``: two classes ``probability`` (of class 1), ``label`` (at
    ``threshold``) and ``true_label``; K > 2 classes one ``prob_<name>`` per class, ``predicted_class`` (its name),
    ``label`` (its index) and ``true_label``; survival ``risk`` (1 = event in the first time bin) and the manifest's
    ``true_time`` / ``true_event`` where given."""
    from scripts.tasks.labels import prob_column

    if task == "survival":
        r = entry.record
        given = {} if r is None or r.time is None else {"true_time": r.time, "true_event": r.event}
        return {"risk": round(pred.probability, 6), **given}
    true = {"true_label": -1 if entry.label is None else entry.label}  # the input manifest's label (-1: none given)
    probs = pred.probabilities
    if probs is None or len(probs) == 2:
        return {"probability": round(pred.probability, 6), "label": int(pred.probability >= threshold), **true}
    names = list(class_names) or [str(i) for i in range(len(probs))]
    k = int(np.argmax(probs))
    return {**{prob_column(n): round(float(p), 6) for n, p in zip(names, probs)}, "predicted_class": names[k], "label": k, **true}


def add_slide_outputs(rows: list[dict], entry: FeatureEntry, pred: SlidePrediction, out: Path, scales_mpp: Sequence[float],
                      **kwargs) -> dict:
    """Write one slide's folder (:func:`write_slide_outputs`), then ``predictions.csv`` with ``rows`` and its row, which
    is appended to ``rows``. ``predictions.csv`` lists exactly the slides whose folders this run wrote: when the CSV
    cannot be written (a full disk), the new folder is removed again."""
    row = write_slide_outputs(entry, pred, out, scales_mpp, **kwargs)
    try:
        with writing(out, "predictions.csv"):
            _write_csv(out / "predictions.csv", [*rows, row])
    except BaseException:
        shutil.rmtree(out / folder_name(entry.slide_id), ignore_errors=True)
        raise
    rows.append(row)
    return row


def write_cohort_outputs(rows: list[dict], out: Path, scales_mpp: Sequence[float]) -> None:
    """``predictions.csv`` and, when lesion masks were found, ``localisation.json``."""
    with writing(out, "predictions.csv and localisation.json"):
        _write_csv(out / "predictions.csv", rows)
        _log_localisation(rows, [scale_name(m) for m in scales_mpp], out)


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _log_localisation(rows: list[dict], names: list[str], out: Path) -> None:
    summary = {}
    for n in names:
        vals = [r[f"localisation_auroc_{n}"] for r in rows if r.get(f"localisation_auroc_{n}") not in (None, "")]
        if vals:
            summary[n] = {"mean_auroc": float(np.mean(vals)), "slides": len(vals)}
    if summary:
        atomic_write_json(out / "localisation.json", summary)
        logger.info("attention localisation AUROC vs lesion masks: %s",
                    ", ".join(f"{n} {v['mean_auroc']:.3f} ({v['slides']} slides)" for n, v in summary.items()))
