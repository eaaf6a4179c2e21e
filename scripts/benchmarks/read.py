"""Multi-scale patch reading: positions/s for all three scales (20x/10x/5x, 256 px each).

* reference: the public CS-MIL code's approach, per patch three level-0 reads of 256/512/1024 px, resized;
* ours, per patch: mpp-planned reads from the best level through MONAI's WSIReader, one read per patch;
* ours, grouped: the same with reads grouped by cell (each needed region decoded once per cell);
* decode lower bound: decode every pyramid tile the patches need exactly once (no cropping, no resizing).

Run on generated JPEG pyramids (levels 1/4/16 like many Aperio slides, and 1/2/4/8) and the real SVS.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import openslide

from scripts.benchmarks.common import large_slide, report, timed
from scripts.wsi.resample import resize_area
from scripts.wsi.slide import SlideReader
from scripts.wsi.tiling import TilingParams, prepare_slide

SCALES = (0.5, 1.0, 2.0)


def reference_patches(slide: openslide.OpenSlide, x: float, y: float, mpp: float) -> list[np.ndarray]:
    """The public CS-MIL code's reading: per scale one level-0 read of 256 / 512 / 1024 px (256 x the scale's
    integer multiple of the level-0 resolution) around the centre, area-resized to 256 (HxWx3 uint8, finest
    scale first)."""
    out = []
    for target in SCALES:
        factor = target / mpp
        size = 256 * max(1, round(factor)) if abs(factor / max(round(factor), 1) - 1) <= 0.05 else int(round(256 * factor))
        region = np.asarray(slide.read_region((int(x - size // 2), int(y - size // 2)), 0, (size, size)).convert("RGB"))
        out.append(resize_area(region, 256) if size != 256 else region)
    return out


def reference(path: Path, coords: np.ndarray, mpp: float) -> None:
    slide = openslide.OpenSlide(str(path))
    for x, y in coords:
        reference_patches(slide, x, y, mpp)
    slide.close()


def ours(path: Path, coords: np.ndarray, cell_um: float) -> None:
    with SlideReader(path, read_cell_um=cell_um) as s:
        plans = [s.plan(m, 256) for m in SCALES]
        for c in coords:
            for p in plans:
                s.read_patch(tuple(c), p)


def needed_tiles(path: Path, coords: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """(level, x, y, w, h) of every tile (level coordinates) that some patch region touches."""
    slide = openslide.OpenSlide(str(path))
    tiles = set()
    with SlideReader(path) as s:
        for p in {(pl.level, pl.region): pl for pl in (s.plan(m, 256) for m in SCALES)}.values():
            tw = int(slide.properties.get(f"openslide.level[{p.level}].tile-width", 256))
            th = int(slide.properties.get(f"openslide.level[{p.level}].tile-height", 256))
            lh, lw = s.level_dims[p.level]
            for c in coords:
                x0, y0 = s.region_origin(tuple(c), p)
                for ty in range(max(0, y0) // th, min(lh - 1, y0 + p.region - 1) // th + 1):
                    for tx in range(max(0, x0) // tw, min(lw - 1, x0 + p.region - 1) // tw + 1):
                        tiles.add((p.level, tx * tw, ty * th, min(tw, lw - tx * tw), min(th, lh - ty * th)))
    slide.close()
    return sorted(tiles)


def decode_tiles(path: Path, tiles, downsamples) -> None:
    slide = openslide.OpenSlide(str(path))
    for level, x, y, w, h in tiles:
        ds = downsamples[level]
        np.asarray(slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h)))
    slide.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks read", description=__doc__)
    ap.add_argument("--size", type=int, default=8192, help="edge of the generated slides (level-0 px)")
    ap.add_argument("--positions", type=int, default=0, help="patch positions timed per slide (0 = the whole slide's grid)")
    ap.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "tests" / "data" / "CMU-1-Small-Region.svs"))
    ap.add_argument("--cell-um", type=float, default=TilingParams.read_cell_um, help="grouped-reading cell size (µm)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="csmil-bench-"))
    slides = {
        "generated 1/4/16": large_slide(work / f"gen_1_4_16_{args.size}.tif", args.size, (1, 4, 16), seed=5),
        "generated 1/2/4/8": large_slide(work / f"gen_1_2_4_8_{args.size}.tif", args.size, (1, 2, 4, 8), seed=5),
    }
    if Path(args.real).is_file():
        slides["real SVS (CMU, 1 level)"] = Path(args.real)
    rows, ratios = [], {}
    for name, path in slides.items():
        # a contiguous run of grid positions (cell order), as a dense tissue area gives
        params = TilingParams(scales_mpp=SCALES, min_tissue=0.0, read_cell_um=args.cell_um)
        coords = np.load(prepare_slide(name.split()[0], path, work / "cache", params) / "coords.npy")[: args.positions or None]
        with SlideReader(path) as s:
            mpp, downsamples = s.mpp, s.downsamples
        n = len(coords)
        t_ref = timed(lambda: reference(path, coords, mpp))
        t_pp = timed(lambda: ours(path, coords, 0.0))
        t_grp = timed(lambda: ours(path, coords, params.read_cell_um))
        tiles = needed_tiles(path, coords)
        t_low = timed(lambda: decode_tiles(path, tiles, downsamples))
        for method, t in [("reference (3 level-0 reads)", t_ref), ("ours, per patch", t_pp), ("ours, grouped", t_grp),
                          (f"decode lower bound ({len(tiles)} tiles)", t_low)]:
            rows.append({"slide": name, "method": method, "positions": n, "positions_per_s": n / t})
        key = name.split()[0] + "_" + name.split()[1].replace("/", "-") if name.startswith("generated") else "real"
        ratios[f"{key}_grouped_vs_reference"] = t_ref / t_grp
        ratios[f"{key}_grouped_vs_lower_bound"] = t_low / t_grp
    report("read", rows, ratios, args.json)
