"""mpp-driven multi-scale access to one whole-slide image, wrapping MONAI's :class:`monai.data.WSIReader`.

MONAI's reader snaps a requested mpp to an existing pyramid level (within a tolerance) but never
resamples. Here each physical scale (e.g. 0.5 / 1 / 2 µm per px) is *planned*: read from the level whose
mpp is the largest not above the target, then area-resize the region to the exact target. Regions of all
scales share one level-0 centre (co-centred patches).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from monai.data import WSIReader

from scripts.data.manifest import MPP_RANGE  # noqa: F401 - re-exported: plausible level-0 µm per px
from scripts.errors import BundleInputError
from scripts.wsi.convert import picture_format
from scripts.wsi.formats import DICOM_BACKENDS, dicom_folder, reader_path
from scripts.wsi.memory import pin_mmap_threshold
from scripts.wsi.resample import block_mean, resize_area

logger = logging.getLogger(__name__)

#: an mpp override within this relative distance of the metadata agrees with it
MPP_AGREE = 0.02
#: plausible level-0 edge lengths in pixels (smaller is a thumbnail or label image, larger a broken header)
SIZE_RANGE = (64, 1_000_000)
BACKENDS = ("openslide", "cucim", "tifffile")
WHITE = 255
#: grouped reading decodes each level in aligned square chunks of this many level pixels, each once
CHUNK_PX = 512
#: decoded and reduced chunks kept per process, over all open slides (MB): neighbouring cells reuse the
#: chunks they share; a whole row of cells fits for slides up to about 13,000 px wide at the read level, so
#: the next row reuses its shared chunks too (wider slides decode those chunk rows twice: <= 25% extra)
READ_CACHE_MB = 128


class ChunkCache:
    """Process-wide LRU cache of slide chunks with a byte budget (one per process: DataLoader workers are
    processes, each with its own cache)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.nbytes = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple, item: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = item
            self.nbytes += item.nbytes
            while self.nbytes > self.budget and len(self._items) > 1:
                self.nbytes -= self._items.popitem(last=False)[1].nbytes

    def keys(self, owner: int) -> list[tuple]:
        """Keys (without the owner) cached for one reader."""
        with self._lock:
            return [k[1:] for k in self._items if k[0] == owner]

    def drop(self, owner: int) -> None:
        """Forget one reader's chunks (when it closes)."""
        with self._lock:
            for k in [k for k in self._items if k[0] == owner]:
                self.nbytes -= self._items.pop(k).nbytes


CHUNK_CACHE = ChunkCache(READ_CACHE_MB * 2**20)
_reader_ids = itertools.count()


@dataclass(frozen=True)
class ScalePlan:
    """How to produce one ``out_size`` patch at ``target_mpp``: read ``region`` px at ``level``, resize."""

    target_mpp: float
    level: int
    level_mpp: float
    level_downsample: float
    region: int
    out_size: int

    @property
    def resample(self) -> bool:
        """True when the region must be resized (no pyramid level has the target mpp)."""
        return self.region != self.out_size

    def to_dict(self) -> dict:
        return asdict(self)


def _other_backend_reads(path: Path, failed: str) -> str | None:
    """The first other installed backend (tifffile) that opens ``path`` with a plausible size, or None."""
    if failed == "tifffile" or path.suffix.lower() not in (".tif", ".tiff", ".svs"):
        return None
    try:
        import tifffile

        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            level0 = tif.series[0].levels[0]
            shape = level0.shape
            page = level0.keyframe
            complete = all(o + c <= size for o, c in zip(page.dataoffsets, page.databytecounts))  # not truncated
        return "tifffile" if complete and len(shape) >= 2 and min(shape[:2]) >= SIZE_RANGE[0] else None
    except Exception:  # noqa: BLE001 - not readable by tifffile either
        return None


class SlideReader:
    """One opened slide: levels, mpp, co-centred region reads.

    Args:
        path: slide file.
        backend: MONAI WSIReader backend: ``openslide`` (default, CPU), ``cucim`` (GPU installs) or ``tifffile``.
        mpp: level-0 microns per pixel overriding the file's metadata (required when the file has none).
        snap_rtol: relative tolerance within which a level counts as having the target mpp (no resize).
        read_cell_um: > 0 turns on grouped reading (the value is the tiling's ordering cell, µm): each level
            is decoded in aligned ``CHUNK_PX`` chunks kept in an LRU cache, and scales that need an integer
            area reduction reduce each chunk once (cached as well), so every patch is a copy from at most
            four cached chunks and every needed tile is decoded once while its chunk is cached. Patches
            should arrive in the tiling's cell order so that the cache holds what neighbours share. 0 reads
            every patch region on its own.
        read_cache_mb: budget of the process-wide chunk cache (decoded and reduced chunks of all open slides;
            the most recently opened reader's value applies).

    In grouped mode, patches from :meth:`read_region` / :meth:`read_patch` may be read-only views into a
    cached chunk (copy them to modify).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        backend: str = "openslide",
        mpp: float | None = None,
        snap_rtol: float = 0.05,
        read_cell_um: float = 0.0,
        read_cache_mb: float = READ_CACHE_MB,
        mpp_force: bool = False,
    ) -> None:
        pin_mmap_threshold()  # resident memory stays flat over millions of patch buffers (see scripts.wsi.memory)
        self.path = Path(path)
        self.read_cell_um = float(read_cell_um or 0.0)
        self._id = next(_reader_ids)
        CHUNK_CACHE.budget = int(read_cache_mb * 2**20)
        if backend not in BACKENDS:
            raise BundleInputError(self.path, f"unknown WSI backend '{backend}'", f"use one of {BACKENDS}")
        dicom = dicom_folder(self.path)
        if dicom is None and not self.path.is_file():
            raise BundleInputError(self.path, "slide file not found", "check the manifest path (relative paths are resolved against the manifest's folder)")
        if dicom is not None and backend not in DICOM_BACKENDS:
            raise BundleInputError(self.path, f"is a DICOM-WSI series, which the {backend} backend does not read",
                                   f"pass --wsi_backend {DICOM_BACKENDS[0]} (OpenSlide 4 reads DICOM-WSI; docs/formats.md)")
        self.backend = backend
        self.snap_rtol = snap_rtol
        self.reader = WSIReader(backend=backend)
        try:
            self.wsi = self.reader.read(reader_path(self.path))
            self.level_count = int(self.reader.get_level_count(self.wsi))
            self.level_dims = [tuple(int(v) for v in self.reader.get_size(self.wsi, lv)) for lv in range(self.level_count)]
            self.downsamples = [float(self.reader.get_downsample_ratio(self.wsi, lv)) for lv in range(self.level_count)]
        except BundleInputError:
            raise
        except Exception as err:  # noqa: BLE001 - every backend raises its own types
            picture = picture_format(self.path)
            if picture is not None:
                raise BundleInputError(
                    self.path, f"is a {picture} picture, not a whole-slide image (no pyramid, no µm per px)",
                    f"pass the whole-slide file (.svs, .tif, .ndpi, ...), or convert the picture given its µm per px: "
                    f"python -m scripts.wsi.convert {self.path.name} {self.path.stem}.tif --mpp 0.5",
                ) from err
            other = _other_backend_reads(self.path, backend)
            raise BundleInputError(
                self.path,
                f"cannot be opened as a whole-slide image with the {backend} backend ({type(err).__name__}: {err})",
                f"the {other} backend reads it: pass --wsi_backend {other}" if other else
                "check that the file is a complete slide (re-copy it if the upload was truncated) or select another backend",
            ) from err
        w, h = self.level_dims[0]
        if not (SIZE_RANGE[0] <= min(w, h) and max(w, h) <= SIZE_RANGE[1]):
            raise BundleInputError(
                self.path, f"implausible slide size {w} x {h} px (expected edges within {SIZE_RANGE})",
                "check that the file is the whole-slide image, not a thumbnail, label or macro image, and that it is not corrupt",
            )
        self.mpp, self.mpp_source = self._resolve_mpp(mpp, mpp_force)

    # ------------------------------------------------------------------ metadata
    def _resolve_mpp(self, override: float | None, force: bool = False) -> tuple[float, str]:
        """Level-0 µm per px: the slide's metadata wins; ``override`` (``--mpp`` or the manifest's ``mpp``) fills
        it in where the metadata has none or an implausible value (outside ``MPP_RANGE``). An override that
        contradicts plausible metadata (by more than 2%) is refused unless ``force`` (``--mpp_force True``), which
        reads the slide at the override."""
        if override is not None and isinstance(override, float) and math.isnan(override):
            override = None
        if override is not None and not (MPP_RANGE[0] <= float(override) <= MPP_RANGE[1]):
            raise BundleInputError(
                self.path,
                f"the mpp override {float(override):g} µm/px (--mpp or the manifest's mpp) is outside the plausible range {MPP_RANGE}",
                "correct the manifest's 'mpp' value (or --mpp): level-0 µm per px, e.g. 0.25 (40x) or 0.5 (20x)",
            )
        meta = self._metadata_mpp()
        if meta is not None and not (MPP_RANGE[0] <= meta <= MPP_RANGE[1]):
            if override is None:
                raise BundleInputError(
                    self.path,
                    f"the slide's metadata says {meta:g} µm/px, outside the plausible range {MPP_RANGE}",
                    "give the slide's level-0 µm per px in the manifest's 'mpp' column (or --mpp), e.g. 0.25 (40x) or 0.5 (20x): "
                    "an override replaces implausible metadata",
                )
            logger.warning("%s: the metadata's %g µm/px is implausible: reading at the override's %g", self.path, meta, float(override))
            return float(override), f"override (implausible metadata: {meta:g})"
        if override is None:
            mpp, source = meta, "metadata"
            if mpp is None:
                raise BundleInputError(
                    self.path,
                    "slide metadata has no microns-per-pixel (mpp)",
                    "add an 'mpp' column to the manifest (0.25 for 40x, 0.5 for 20x scans) or pass --mpp",
                )
        elif meta is None:
            mpp, source = float(override), "override"
        elif abs(float(override) - meta) <= MPP_AGREE * meta:
            mpp, source = meta, "metadata"
        elif force:
            mpp, source = float(override), f"forced override (metadata: {meta:g})"
            logger.warning("%s: reading at %g µm/px although the slide's metadata says %g (--mpp_force)", self.path, mpp, meta)
        else:
            raise BundleInputError(
                self.path,
                f"the slide's metadata says {meta:g} µm/px but the mpp override (--mpp or the manifest's mpp) says {float(override):g}",
                f"the metadata wins: drop the override for this slide, or pass --mpp_force True to read it at {float(override):g} µm/px",
            )
        return mpp, source

    def _metadata_mpp(self) -> float | None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mpp_y, mpp_x = self.reader.get_mpp(self.wsi, 0)
            except Exception:  # noqa: BLE001 - no resolution information
                return None
        if any("unit is missing" in str(w.message) for w in caught):
            return None  # MONAI would guess micrometres: refuse to guess
        mpp = float(mpp_x)
        if not mpp > 0 or not math.isfinite(mpp):
            return None
        if abs(mpp_y - mpp_x) > 0.01 * mpp:
            logger.warning("%s: anisotropic pixels (%.4f x %.4f µm); using x", self.path, mpp_x, mpp_y)
        return mpp

    @property
    def size(self) -> tuple[int, int]:
        """Level-0 (height, width)."""
        return self.level_dims[0]

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.downsamples[level]

    # ------------------------------------------------------------------ planning
    def plan(self, target_mpp: float, out_size: int) -> ScalePlan:
        """Choose the level for ``target_mpp`` (largest mpp not above it) and the region size to read."""
        candidates = [lv for lv in range(self.level_count) if self.level_mpp(lv) <= target_mpp * (1 + self.snap_rtol)]
        if not candidates:
            raise BundleInputError(
                self.path,
                f"requested scale {target_mpp:g} µm/px is finer than the slide's native {self.mpp:g} µm/px",
                "remove that scale from 'scales_mpp' or use slides scanned at a higher magnification",
            )
        level = max(candidates, key=self.level_mpp)
        factor = target_mpp / self.level_mpp(level)
        if abs(factor / max(round(factor), 1) - 1) <= self.snap_rtol:
            factor = max(round(factor), 1)  # e.g. 0.499 µm/px slides: exact 2x / 4x block averages, not 2.004x
        region = int(round(out_size * factor))
        return ScalePlan(
            target_mpp=float(target_mpp),
            level=level,
            level_mpp=self.level_mpp(level),
            level_downsample=self.downsamples[level],
            region=region,
            out_size=int(out_size),
        )

    def region_origin(self, centre_xy: tuple[float, float], plan: ScalePlan) -> tuple[int, int]:
        """Top-left (x, y) in *level* pixels of the region centred on a level-0 centre."""
        ds = plan.level_downsample
        return (
            int(round(centre_xy[0] / ds - plan.region / 2)),
            int(round(centre_xy[1] / ds - plan.region / 2)),
        )

    def region_centre(self, centre_xy: tuple[float, float], plan: ScalePlan) -> tuple[float, float]:
        """Level-0 centre actually covered by :meth:`read_region` (for co-centring checks)."""
        x0, y0 = self.region_origin(centre_xy, plan)
        ds = plan.level_downsample
        return ((x0 + plan.region / 2) * ds, (y0 + plan.region / 2) * ds)

    # ------------------------------------------------------------------ reading
    def read_level_box(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Read a box in level coordinates as HxWx3 uint8; parts outside the slide are white."""
        lh, lw = self.level_dims[level]
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, lw), min(y0 + h, lh)
        inside = (ix0, iy0, ix1, iy1) == (x0, y0, x0 + w, y0 + h)
        out = None if inside else np.full((h, w, 3), WHITE, dtype=np.uint8)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        ds = self.downsamples[level]
        loc = (int(round(iy0 * ds)), int(round(ix0 * ds)))  # MONAI: (top, left) in level-0 pixels
        try:
            data, _ = self.reader.get_data(self.wsi, location=loc, size=(iy1 - iy0, ix1 - ix0), level=level)
        except Exception as err:  # noqa: BLE001
            raise BundleInputError(
                self.path,
                f"reading level {level} at ({ix0}, {iy0}) failed ({type(err).__name__}: {err})",
                "the file is probably truncated or corrupt: re-copy or re-scan it",
            ) from err
        pixels = np.moveaxis(np.asarray(data), 0, -1)[..., :3]
        if inside:
            return np.ascontiguousarray(pixels)
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = pixels
        return out

    def read_region(self, centre_xy: tuple[float, float], plan: ScalePlan) -> np.ndarray:
        """Read the (unresized) ``plan.region`` square around a level-0 centre: HxWx3 uint8."""
        x0, y0 = self.region_origin(centre_xy, plan)
        r = plan.region
        if self.read_cell_um <= 0:
            return self.read_level_box(plan.level, x0, y0, r, r)
        return self._assemble(plan.level, 1, x0, y0, r, r)

    def read_patch(self, centre_xy: tuple[float, float], plan: ScalePlan) -> np.ndarray:
        """Read and area-resize to the exact target scale: ``out_size`` x ``out_size`` x 3 uint8.

        With grouped reading and an integer resampling factor ``f`` (dividing ``CHUNK_PX``), the patch is
        cut from chunks reduced by ``f`` once each (same pixels as reducing the patch's own region when its
        origin is a multiple of ``f``, which the tiling's alignment guarantees).
        """
        if not plan.resample:
            return self.read_region(centre_xy, plan)
        f = plan.region // plan.out_size
        if self.read_cell_um > 0 and f * plan.out_size == plan.region and CHUNK_PX % f == 0:
            x0, y0 = self.region_origin(centre_xy, plan)
            if x0 % f == 0 and y0 % f == 0:
                n = plan.out_size
                return self._assemble(plan.level, f, x0 // f, y0 // f, n, n)
        return resize_area(self.read_region(centre_xy, plan), plan.out_size)

    def _assemble(self, level: int, factor: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """The box (x0, y0, w, h) of ``level`` reduced by ``factor`` (coordinates in reduced px), cut from
        cached chunks: a view when it lies in one chunk, else a copy."""
        c = CHUNK_PX // factor
        cx0, cy0, cx1, cy1 = x0 // c, y0 // c, (x0 + w - 1) // c, (y0 + h - 1) // c
        if cx0 == cx1 and cy0 == cy1:
            chunk = self._chunk(level, factor, cx0, cy0)
            return chunk[y0 - cy0 * c : y0 - cy0 * c + h, x0 - cx0 * c : x0 - cx0 * c + w]
        out = np.empty((h, w, 3), dtype=np.uint8)
        for cy in range(cy0, cy1 + 1):
            for cx in range(cx0, cx1 + 1):
                chunk = self._chunk(level, factor, cx, cy)
                ix0, iy0 = max(x0, cx * c), max(y0, cy * c)
                ix1, iy1 = min(x0 + w, (cx + 1) * c), min(y0 + h, (cy + 1) * c)
                out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = chunk[iy0 - cy * c : iy1 - cy * c, ix0 - cx * c : ix1 - cx * c]
        return out

    def _chunk(self, level: int, factor: int, cx: int, cy: int) -> np.ndarray:
        """Chunk (cx, cy) of ``level`` (``CHUNK_PX`` level px, white beyond the slide), reduced by ``factor``;
        from the LRU cache or decoded / reduced once and cached."""
        key = (self._id, level, factor, cx, cy)
        chunk = CHUNK_CACHE.get(key)
        if chunk is not None:
            return chunk
        if factor == 1:
            chunk = self.read_level_box(level, cx * CHUNK_PX, cy * CHUNK_PX, CHUNK_PX, CHUNK_PX)
        else:
            chunk = block_mean(self._chunk(level, 1, cx, cy), factor)
        chunk.flags.writeable = False  # patches may be views into it
        CHUNK_CACHE.put(key, chunk)
        return chunk

    def cached_chunks(self) -> list[tuple[int, int, int, int]]:
        """(level, factor, cx, cy) of this slide's chunks in the cache."""
        return CHUNK_CACHE.keys(self._id)

    def thumbnail(self, target_mpp: float) -> np.ndarray:
        """Whole slide at ``target_mpp`` (or the coarsest level if that is finer), HxWx3 uint8.

        Reads the level just finer than the target in horizontal strips, so memory stays bounded by the
        thumbnail, not by the level.
        """
        finer = [lv for lv in range(self.level_count) if self.level_mpp(lv) <= target_mpp]
        level = max(finer, key=self.level_mpp) if finer else self.level_count - 1
        lh, lw = self.level_dims[level]
        factor = max(1, int(target_mpp / self.level_mpp(level)))
        out_h, out_w = max(1, int(lh * self.level_mpp(level) / target_mpp)), max(1, int(lw * self.level_mpp(level) / target_mpp))
        strip = max(factor, (2048 // factor) * factor)
        rows = []
        for y in range(0, lh, strip):
            h = min(strip, lh - y)
            rows.append(block_mean(self.read_level_box(level, 0, y, lw, h), factor))
        thumb = np.concatenate(rows, axis=0)
        if thumb.shape[:2] != (out_h, out_w):
            thumb = resize_area(thumb, (out_h, out_w))
        return thumb

    def close(self) -> None:
        CHUNK_CACHE.drop(self._id)
        close = getattr(self.wsi, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
