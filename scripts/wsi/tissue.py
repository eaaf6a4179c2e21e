"""Tissue detection on a low-resolution thumbnail: Otsu threshold on HSV saturation plus a minimum area.

Otsu is written here (a dozen lines of numpy) rather than pulling scikit-image in for one function;
morphology and connected components come from scipy.ndimage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class TissueParams:
    """Every threshold named, documented and saved with the output (CLAM style).

    Attributes:
        thumbnail_mpp: resolution of the thumbnail the mask is computed on (µm per px).
        min_saturation: lower bound on the saturation threshold (0..1), guards blank slides.
        min_area_um2: connected tissue components smaller than this are dropped (µm²).
        close_um: morphological closing radius that bridges small gaps (µm).
        max_value: pixels brighter than this in all channels are background regardless of saturation.
    """

    thumbnail_mpp: float = 8.0
    min_saturation: float = 0.05
    min_area_um2: float = 20000.0
    close_um: float = 32.0
    max_value: int = 235


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 1-D values in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an HxWx3 uint8 image, in [0, 1]."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)


def tissue_mask(thumbnail: np.ndarray, params: TissueParams) -> tuple[np.ndarray, dict]:
    """Boolean tissue mask of a thumbnail taken at ``params.thumbnail_mpp``, and the thresholds used."""
    sat = saturation(thumbnail)
    thr = max(otsu_threshold(sat.ravel()), params.min_saturation)
    mask = (sat > thr) & ~(thumbnail.min(axis=-1) > params.max_value)
    radius = max(1, int(round(params.close_um / params.thumbnail_mpp)))
    structure = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_closing(mask, structure=structure, iterations=radius)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    min_px = params.min_area_um2 / params.thumbnail_mpp**2
    if n:
        areas = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = areas >= min_px
        mask = keep[labels]
    return mask, {"saturation_threshold": thr, "components": int(n), "min_area_px": float(min_px)}
