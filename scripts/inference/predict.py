"""Slide predictions (mean probability over random bags, the paper's test protocol) and attention of every
patch at every scale (one pass over all of a slide's patches, grouped by cluster)."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from scripts.cache import atomic_write_bytes, atomic_write_json, stable_hash
from scripts.errors import BundleInputError
from scripts.features.encoders import check_state_matches
from scripts.features.store import FeatureEntry
from scripts.maps import export
from scripts.mil.bags import gather_bag, sample_bag
from scripts.wsi.slide import SlideReader

logger = logging.getLogger(__name__)


def load_network(network: torch.nn.Module, ckpt_path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a CS-MIL checkpoint (``weights_only=True``) into ``network``; mismatches are listed."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise BundleInputError(ckpt_path, "model checkpoint not found", "train first (python -m monai.bundle run training --config_file configs/train.yaml) or pass --ckpt_path")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    check_state_matches(network, state, ckpt_path, "use the MIL model (--mil_model, e.g. csmil for a checkpoint of the "
                        "paper's CS-MIL) and encoder (hence in_features) the checkpoint was trained with")
    network.load_state_dict(state)
    return network.to(device).eval()


def full_bag(clusters: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """All patches in one bag, cluster-major with ``max cluster size`` slots per cluster: (idx, mask)."""
    counts = np.bincount(clusters, minlength=num_clusters)
    m = max(1, int(counts.max()))
    idx = np.full(num_clusters * m, -1, np.int64)
    for k in range(num_clusters):
        members = np.flatnonzero(clusters == k)
        idx[k * m : k * m + len(members)] = members
    return idx, idx >= 0


@dataclass
class SlidePrediction:
    slide_id: str
    probability: float
    attention: np.ndarray  # [N, S] raw per-patch, per-scale attention (patch share x scale weight)
    scale_weights: np.ndarray  # [N, S]
    seconds: float


@torch.inference_mode()
def bag_probability(
    network: torch.nn.Module, entry: FeatureEntry, num_clusters: int, per_cluster: int, num_bags: int = 100,
    replacement: bool = False, seed: int = 0, device: str | torch.device = "cpu", chunk: int = 25,
) -> float:
    """Mean probability of class 1 over ``num_bags`` random bags, seeded by ``(seed, slide id)`` (the paper's
    test protocol); bags go through the network ``chunk`` at a time."""
    feats, clusters = entry.features(), entry.clusters()
    if clusters is None:
        raise BundleInputError(entry.path, "feature entry has no clusters", "run the cluster stage")
    rng = np.random.default_rng([seed, int(stable_hash(entry.slide_id, 8), 16)])
    probs = []
    for start in range(0, num_bags, chunk):
        bags = [sample_bag(clusters, num_clusters, per_cluster, rng, replacement) for _ in range(min(chunk, num_bags - start))]
        x = torch.stack([gather_bag(feats, i) for i, _ in bags]).to(device)
        m = torch.stack([torch.from_numpy(mk) for _, mk in bags]).to(device)
        probs.append(torch.softmax(network(x, m).float(), -1)[:, 1].cpu())
    return float(torch.cat(probs).mean())


@torch.inference_mode()
def patch_attention(
    network: torch.nn.Module, entry: FeatureEntry, num_clusters: int, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over all of a slide's patches (one bag, grouped by cluster): per-patch, per-scale attention
    [N, S] (the patch's share x its scale weight) and the scale weights [N, S]."""
    feats, clusters = entry.features(), entry.clusters()
    idx, mask = full_bag(clusters, num_clusters)
    x = gather_bag(feats, idx)[None].to(device)
    _, att = network.forward_attention(x, torch.from_numpy(mask)[None].to(device))
    valid = idx[mask]
    n, s = len(feats), feats.shape[1]
    scale = np.zeros((n, s), np.float32)
    patch = np.zeros(n, np.float32)
    scale[valid] = att["scale"][0][torch.from_numpy(mask)].float().cpu().numpy()
    patch[valid] = att["patch"][0][torch.from_numpy(mask)].float().cpu().numpy()
    return patch[:, None] * scale, scale


def predict_entry(
    network: torch.nn.Module, entry: FeatureEntry, num_clusters: int, per_cluster: int, num_bags: int = 100,
    replacement: bool = False, seed: int = 0, device: str | torch.device = "cpu", chunk: int = 25,
) -> SlidePrediction:
    """Mean probability of class 1 over ``num_bags`` seeded random bags, and attention of every patch."""
    t0 = time.perf_counter()
    probability = bag_probability(network, entry, num_clusters, per_cluster, num_bags, replacement, seed, device, chunk)
    attention, scale = patch_attention(network, entry, num_clusters, device)
    return SlidePrediction(entry.slide_id, probability, attention, scale, time.perf_counter() - t0)


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
    """Per-scale localisation AUROC of ``attention`` [N, S] against ``masks/<slide_id>.png`` (None without a mask)."""
    mask_file = masks / f"{entry.slide_id}.png" if masks else None
    if mask_file is None or not mask_file.is_file():
        return None
    slide_mpp = float(json.loads((Path(entry.meta["tiles_dir"]) / "meta.json").read_text())["mpp"])
    return localisation_auroc(entry.coords().astype(np.float64), attention, np.asarray(Image.open(mask_file)), lesion_mask_mpp, slide_mpp)


def scale_name(mpp: float) -> str:
    """Conventional magnification of a resolution: 0.5 µm/px -> '20x', 1 -> '10x', 2 -> '5x'."""
    return f"{10.0 / float(mpp):g}x"


def _masks_dir(input_path, dataset_dir) -> Path | None:
    if input_path is None:
        return Path(dataset_dir) / "masks"
    p = Path(input_path)
    return (p if p.is_dir() else p.parent) / "masks"


def write_slide_outputs(
    entry: FeatureEntry, pred: SlidePrediction, out: Path, scales_mpp: Sequence[float], threshold: float = 0.5,
    masks: Path | None = None, lesion_mask_mpp: float = 8.0, heatmap_mpp: float = 8.0, overlay_mpp: float = 4.0,
) -> dict:
    """Per-scale PNG overlays, scale composite, QuPath GeoJSON, pyramidal TIFF heatmaps and ``prediction.json``
    of one slide in ``out/<slide_id>/``; returns its ``predictions.csv`` row."""
    names = [scale_name(m) for m in scales_mpp]
    tiles_meta = json.loads((Path(entry.meta["tiles_dir"]) / "meta.json").read_text())
    slide_mpp = float(tiles_meta["mpp"])
    coords = entry.coords().astype(np.float64)
    norm = export.normalise_per_scale(pred.attention)
    patch_size = int(tiles_meta["tiling"]["patch_size"])  # as the slide was tiled (the config's patch_size)
    footprint = patch_size * min(scales_mpp) / slide_mpp  # the finest scale's patch square, level-0 px
    sdir = out / entry.slide_id
    sdir.mkdir(parents=True, exist_ok=True)
    with SlideReader(tiles_meta["path"], backend=tiles_meta["tiling"]["backend"], mpp=slide_mpp) as slide:
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
    row = {
        "slide_id": entry.slide_id,
        "probability": round(pred.probability, 6),
        "label": int(pred.probability >= threshold),
        "true_label": int(entry.meta.get("label", -1)),
        "num_patches": entry.num_patches,
        "predict_seconds": round(pred.seconds, 3),
    }
    aurocs = entry_localisation(entry, pred.attention, masks, lesion_mask_mpp)
    if aurocs is not None:
        row.update({f"localisation_auroc_{n}": ("" if a is None else round(a, 4)) for n, a in zip(names, aurocs)})
    atomic_write_json(sdir / "prediction.json", {**row, "scales": names, "attention_normalisation": "min-max per scale"})
    return row


def write_cohort_outputs(rows: list[dict], out: Path, scales_mpp: Sequence[float]) -> None:
    """``predictions.csv`` and, when lesion masks were found, ``localisation.json``."""
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
