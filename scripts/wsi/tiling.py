"""Grid of co-centred patch centres on tissue, and the cached ``prepare`` stage per slide."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from scripts.cache import atomic_dir, release_claim, remove_stale_temporaries, stable_hash, try_claim
from scripts.data.ids import folder_name
from scripts.wsi.formats import is_slide, slide_fingerprint
from scripts.errors import BundleInputError
from scripts.wsi.slide import SlideReader
from scripts.wsi.tissue import TissueParams, tissue_mask

logger = logging.getLogger(__name__)

TILING_VERSION = 4  # 4: an mpp override no longer wins over slide metadata (entries made under 3 may have used it)


@dataclass(frozen=True)
class TilingParams:
    """Parameters of the patch grid (all saved with the output).

    Attributes:
        scales_mpp: physical scales of the co-centred patches (µm per px), finest first: 20x/10x/5x = 0.5/1/2.
        patch_size: patch edge in pixels at every scale.
        step_um: grid spacing in µm (default: the finest patch's extent, i.e. non-overlapping at 20x).
        min_tissue: minimum tissue fraction inside the finest patch for its centre to be kept.
        max_patches: keep at most this many centres per slide (seeded random subset; 0 = all).
        seed: seed of that subset.
        backend: WSI reader backend.
        read_cell_um: centres are ordered cell by cell on a grid of this size (µm), so that the grouped
            reader's chunk cache (:class:`scripts.wsi.slide.SlideReader`) holds what neighbouring patches
            share and every chunk is decoded once; also turns grouped reading on (0: patch by patch).
        tissue: tissue-detection parameters.
    """

    scales_mpp: Sequence[float] = (0.5, 1.0, 2.0)
    patch_size: int = 256
    step_um: float | None = None
    min_tissue: float = 0.5
    max_patches: int = 0
    seed: int = 0
    backend: str = "openslide"
    read_cell_um: float = 1024.0
    tissue: TissueParams = field(default_factory=TissueParams)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scales_mpp"] = [float(s) for s in self.scales_mpp]
        return d


def grid_centres(
    mask: np.ndarray, mask_mpp: float, slide_mpp: float, slide_hw: tuple[int, int], params: TilingParams, align: int
) -> np.ndarray:
    """Level-0 (x, y) centres on a regular grid whose finest-scale patch is mostly tissue.

    Centres are multiples of ``align`` level-0 pixels so that every pyramid level used reads an
    integer-aligned region with exactly the same centre (co-centring without sub-pixel shifts).
    """
    finest = min(params.scales_mpp)
    extent_um = params.patch_size * finest
    step_um = params.step_um or extent_um
    step = max(align, int(round(step_um / slide_mpp / align)) * align)
    h0, w0 = slide_hw
    half = extent_um / slide_mpp / 2
    first = int(math.ceil(half / align)) * align
    xs = np.arange(first, w0 - half + 1, step)
    ys = np.arange(first, h0 - half + 1, step)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # tissue fraction of the finest patch footprint, sampled from the mask with a box filter
    box = max(1, int(round(extent_um / mask_mpp)))
    frac = ndimage.uniform_filter(mask.astype(np.float32), size=box, mode="constant")
    gx, gy = np.meshgrid(xs, ys)
    mx = np.clip((gx * slide_mpp / mask_mpp).astype(int), 0, mask.shape[1] - 1)
    my = np.clip((gy * slide_mpp / mask_mpp).astype(int), 0, mask.shape[0] - 1)
    keep = frac[my, mx] >= params.min_tissue
    centres = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64)
    if params.max_patches and len(centres) > params.max_patches:
        rng = np.random.default_rng(params.seed)
        idx = np.sort(rng.choice(len(centres), size=params.max_patches, replace=False))
        centres = centres[idx]
    return order_by_cell(centres, params.read_cell_um / slide_mpp if params.read_cell_um else 0.0)


def order_by_cell(centres: np.ndarray, cell_px: float) -> np.ndarray:
    """Sort centres cell by cell (cells row-major, centres row-major inside a cell)."""
    if cell_px <= 0 or len(centres) == 0:
        return centres
    cx, cy = centres[:, 0] // cell_px, centres[:, 1] // cell_px
    return centres[np.lexsort((centres[:, 0], centres[:, 1], cx, cy))]


def alignment(slide: SlideReader, scales_mpp: Sequence[float], patch_size: int) -> int:
    """Level-0 grid alignment: the largest (level downsample x integer resampling factor) of the scales,
    so every scale's region starts on a whole pixel of its level and on a multiple of its resampling
    factor (co-centred regions without sub-pixel shifts; block averages shareable across patches)."""
    steps = []
    for s in scales_mpp:
        p = slide.plan(s, patch_size)
        f = p.region // p.out_size if p.region % p.out_size == 0 else 1
        steps.append(int(round(p.level_downsample)) * f)
    return max(1, max(steps))


def prepare_slide(
    slide_id: str,
    path: str | Path,
    cache_dir: str | Path,
    params: TilingParams,
    mpp: float | None = None,
    mpp_force: bool = False,
) -> Path:
    """Tissue mask + patch centres for one slide, cached under ``cache_dir/tiles``; returns the entry dir.

    The entry (``coords.npy`` level-0 centres (x, y), ``tissue.png`` QC mask, ``meta.json``) is named by a
    hash of the slide fingerprint and the tiling parameters, and written atomically.
    """
    path = Path(path)
    if not is_slide(path):
        raise BundleInputError(path, f"slide '{slide_id}' not found", "fix the manifest's 'path' column (relative to the manifest's folder)")
    provenance = {
        "version": TILING_VERSION,
        "slide": slide_fingerprint(path),
        "mpp_override": mpp,
        "tiling": params.to_dict(),
    }
    if mpp_force:
        provenance["mpp_force"] = True
    root = Path(cache_dir) / "tiles"
    entry = root / f"{folder_name(slide_id)}-{stable_hash(provenance)}"  # ids are data, not paths
    if (entry / "meta.json").is_file():
        return entry
    remove_stale_temporaries(root)
    while not try_claim(entry):  # another process tiles this slide: wait for its entry
        if (entry / "meta.json").is_file():
            return entry
        time.sleep(0.2)
    try:
        if (entry / "meta.json").is_file():
            return entry
        return _tile(slide_id, path, entry, params, mpp, provenance, mpp_force)
    finally:
        release_claim(entry)


def no_patch_reason(path: Path, slide: SlideReader, thumb: np.ndarray, mask: np.ndarray, params: "TilingParams") -> BundleInputError:
    """Why a slide gave no patch, as the error to raise: too small for the coarsest field, no colour, no
    tissue at all, or tissue that never fills ``min_tissue`` of a patch."""
    h_um, w_um = (d * slide.mpp for d in slide.size)
    field = params.patch_size * max(params.scales_mpp)
    if min(h_um, w_um) < field:
        return BundleInputError(
            path, f"the slide ({w_um:.0f} x {h_um:.0f} µm) is smaller than the coarsest scale's field ({params.patch_size} px at "
            f"{max(params.scales_mpp):g} µm/px = {field:.0f} µm)", "drop the coarsest scale from --scales_mpp, lower --patch_size, or use a larger slide")
    if not mask.any():
        rgb = thumb[..., :3].astype(np.int16)
        grey = np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).max() <= 2
        if grey and rgb.mean(axis=-1).std() > 8:  # structure without colour
            return BundleInputError(
                path, "the slide has no colour (grayscale): tissue is found by its stain saturation",
                "use RGB brightfield (H&E) slides; grayscale or fluorescence slides are not supported")
        return BundleInputError(
            path, f"no tissue found (no region above the saturation threshold {params.tissue.min_saturation:g}; the slide looks blank)",
            "check the slide is not blank, or lower --tissue_min_saturation")
    return BundleInputError(
        path, f"tissue covers {mask.mean():.1%} of the slide but no patch has >= {params.min_tissue:.0%} tissue",
        "lower --min_tissue (or --tissue_min_area_um2 for small fragments)")


def _tile(slide_id: str, path: Path, entry: Path, params: "TilingParams", mpp: float | None, provenance: dict,
          mpp_force: bool = False) -> Path:
    with SlideReader(path, backend=params.backend, mpp=mpp, mpp_force=mpp_force) as slide:
        plans = [slide.plan(s, params.patch_size) for s in params.scales_mpp]
        thumb = slide.thumbnail(params.tissue.thumbnail_mpp)
        mask_mpp = slide.size[1] * slide.mpp / thumb.shape[1]
        mask, tissue_info = tissue_mask(thumb, params.tissue)
        align = alignment(slide, params.scales_mpp, params.patch_size)
        centres = grid_centres(mask, mask_mpp, slide.mpp, slide.size, params, align)
        if len(centres) == 0:
            raise no_patch_reason(path, slide, thumb, mask, params)
        meta = {
            **provenance,
            "slide_id": slide_id,
            "path": str(path.resolve()),
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "level_dims": slide.level_dims,
            "level_downsamples": slide.downsamples,
            "plans": [p.to_dict() for p in plans],
            "align": align,
            "thumbnail_mpp": mask_mpp,
            "tissue": tissue_info,
            "num_patches": int(len(centres)),
        }
    with atomic_dir(entry, f"the tiles of slide '{slide_id}'") as tmp:
        np.save(tmp / "coords.npy", centres)
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp / "tissue.png")
        Image.fromarray(thumb).save(tmp / "thumbnail.png")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    logger.info("%s: %d patch centres (mpp %.3f from %s)", slide_id, len(centres), meta["mpp"], meta["mpp_source"])
    return entry
