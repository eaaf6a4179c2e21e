"""Write pyramidal TIFFs with tifffile (demo slides, test fixtures, heatmaps).

Levels are successive tiled pages (level 0 full resolution, later pages flagged as reduced-resolution),
with resolution tags in centimetres so that OpenSlide, tifffile and MONAI's WSIReader all report mpp.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

from scripts.cache import _TMP_PREFIX
from scripts.wsi.resample import block_mean


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter (area) downsample of an HxW(xC) uint8 image by an integer factor (edges cropped)."""
    return block_mean(image, factor)


def write_pyramid(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float | None,
    downsamples: Sequence[int] = (1, 2, 4, 8),
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
) -> Path:
    """Write ``image`` (HxWx3 uint8, level 0) as a tiled pyramidal TIFF, atomically.

    Args:
        path: output ``.tif`` path.
        image: level-0 RGB pixels.
        mpp: microns per pixel at level 0 (``None`` writes no resolution tags: a slide without mpp).
        downsamples: integer factor of each level relative to level 0; must start with 1.
        tile: tile edge in pixels (multiple of 16).
        compression: ``"jpeg"``, ``"deflate"`` or ``"none"``.
        quality: JPEG quality.
    """
    if downsamples[0] != 1:
        raise ValueError("downsamples must start with 1 (level 0)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{os.getpid()}"
    comp = None if compression == "none" else compression
    comp_args = {"level": quality} if compression == "jpeg" else None
    try:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
            for i, ds in enumerate(downsamples):
                level = area_downsample(image, ds)
                kwargs = {}
                if mpp is not None:
                    res = 1e4 / (mpp * ds)  # pixels per centimetre
                    kwargs = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
                tw.write(
                    level,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression=comp,
                    compressionargs=comp_args,
                    subfiletype=0 if i == 0 else 1,
                    metadata=None,
                    **kwargs,
                )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
