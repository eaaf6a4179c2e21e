"""Exports of per-patch, per-scale attention that pathologists can open.

* PNG overlays on the slide thumbnail (one per scale, plus a composite whose red/green/blue channels are
  the 20x/10x/5x attention: the colour says at which scale the model looked);
* a QuPath-importable GeoJSON FeatureCollection of patch squares in level-0 pixel coordinates, with the
  attention of every scale as measurements;
* a pyramidal TIFF heatmap per scale, calibrated in µm per px so that it overlays the slide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from scripts.cache import atomic_write_bytes
from scripts.wsi.pyramid import write_pyramid

# perceptually ordered dark-purple -> orange -> yellow anchors (an "inferno"-like ramp)
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def normalise_per_scale(values: np.ndarray) -> np.ndarray:
    """Min-max normalise each column (scale) of [N, S] to 0..1 (a constant column becomes 0)."""
    v = np.asarray(values, np.float64)
    lo, hi = v.min(axis=0, keepdims=True), v.max(axis=0, keepdims=True)
    return np.where(hi > lo, (v - lo) / np.where(hi > lo, hi - lo, 1), 0.0)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in 0..1 (any shape) to RGB uint8."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0, 1)
    pos = v * (len(_ANCHORS) - 1)
    i = np.minimum(pos.astype(int), len(_ANCHORS) - 2)
    t = (pos - i)[..., None]
    return np.rint(_ANCHORS[i] * (1 - t) + _ANCHORS[i + 1] * t).astype(np.uint8)


def rasterise(
    coords: np.ndarray, values: np.ndarray, footprint_px: float, shape: tuple[int, int], scale: float
) -> np.ndarray:
    """Paint each patch's value over its square footprint (level-0 px) on a grid where one pixel is
    ``scale`` level-0 pixels; overlapping squares keep the maximum; NaN where no patch."""
    out = np.full(shape, np.nan, np.float32)
    half = footprint_px / 2
    for (x, y), v in zip(coords, values):
        x0, x1 = int(np.floor((x - half) / scale)), int(np.ceil((x + half) / scale))
        y0, y1 = int(np.floor((y - half) / scale)), int(np.ceil((y + half) / scale))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, shape[1]), min(y1, shape[0])
        if x1 > x0 and y1 > y0:
            block = out[y0:y1, x0:x1]
            np.fmax(block, v, out=block)
    return out


def overlay(thumbnail: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend a colour-mapped heat grid onto a thumbnail of the same shape; opacity grows with the value
    (NaN = no patch = transparent) so low-attention tissue stays readable."""
    rgb = colormap(heat).astype(np.float32)
    a = np.where(np.isnan(heat), 0.0, alpha * (0.25 + 0.75 * np.nan_to_num(heat, nan=0.0)))[..., None]
    return np.rint(thumbnail.astype(np.float32) * (1 - a) + rgb * a).astype(np.uint8)


def scale_composite(thumbnail: np.ndarray, heats: Sequence[np.ndarray], alpha: float = 0.7) -> np.ndarray:
    """Composite: channel c = attention of scale c (first three scales); grey where no patch."""
    rgb = np.stack([np.nan_to_num(h, nan=0.0) for h in list(heats)[:3]] + [np.zeros_like(heats[0])] * (3 - min(3, len(heats))), -1)
    a = np.where(np.isnan(heats[0]), 0.0, alpha)[..., None]
    gray = thumbnail.astype(np.float32).mean(-1, keepdims=True)
    return np.rint(gray * (1 - a) + 255 * rgb * a).astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_geojson(
    path: str | Path, coords: np.ndarray, footprint_px: float, measurements: Mapping[str, np.ndarray], name: str = "patch"
) -> None:
    """QuPath-importable FeatureCollection: one square detection per patch, level-0 pixel coordinates."""
    half = footprint_px / 2
    features = []
    for i, (x, y) in enumerate(np.asarray(coords, float)):
        ring = [[x - half, y - half], [x + half, y - half], [x + half, y + half], [x - half, y + half], [x - half, y - half]]
        features.append({
            "type": "Feature",
            "id": f"{name}-{i}",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "name": f"{name} {i}",
                "measurements": {k: float(v[i]) for k, v in measurements.items()},
            },
        })
    atomic_write_bytes(path, json.dumps({"type": "FeatureCollection", "features": features}).encode())


def write_heatmap_tiff(path: str | Path, heat: np.ndarray, mpp: float) -> Path:
    """Colour-mapped heat grid as a pyramidal TIFF (white where no patch) at ``mpp`` µm per px."""
    rgb = colormap(heat)
    rgb[np.isnan(heat)] = 255
    downsamples = [1]
    while min(heat.shape) // (downsamples[-1] * 2) >= 64:
        downsamples.append(downsamples[-1] * 2)
    return write_pyramid(path, rgb, mpp=mpp, downsamples=downsamples, tile=128, compression="deflate")
