"""Deterministic demo cohort: pyramidal TIFF slides whose label shows only across scales.

Every slide holds tissue on a white background with nuclei everywhere and four structures:

* ``T``  fine texture: a disc of dense small dots (period 4 µm) — visible at 20x/10x, a flat tint at 5x;
* ``R+S`` a ring (visible only in a 5x field of view) around a smooth tint of the same mean colour as ``T``;
* ``R+T`` the lesion: the same ring around the fine texture.

At 5x the lesion and ``R+S`` look alike; at 20x the lesion and ``T`` look alike. Only the combination of
the 20x texture and the 5x ring at one location tells a positive slide (it holds >= 1 lesion) from a
negative one (``T`` and ``R+S`` only). Lesion masks are written for scoring attention maps.

The same principle makes harder *co-location cohorts* (cue size, contrast, texture period, ring shape, number
of structures and lesions, pyramid levels are parameters; :data:`COLOCATION_COHORTS` names the ones the
fusion ablation in docs/evaluation.md uses). Parameters left at their defaults keep the demo's slides and
cache keys unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from scripts.cache import atomic_write_json, stable_hash
from scripts.data.manifest import SlideRecord, write_manifest
from scripts.wsi.pyramid import write_pyramid

logger = logging.getLogger(__name__)

DEMO_VERSION = 1
BACKGROUND = np.array([242, 240, 244], np.float32)
STROMA = np.array([232, 168, 200], np.float32)
NUCLEUS = np.array([118, 62, 150], np.float32)
DOT = np.array([80, 30, 110], np.float32)
RING = np.array([196, 110, 168], np.float32)
RING_2 = np.array([150, 150, 205], np.float32)  # the second ring of a three-class cohort with second_ring='colour'



@dataclass(frozen=True)
class DemoParams:
    """Demo cohort parameters (the cohort is a pure function of these).

    Attributes:
        num_patients: patients (half positive, rounded down).
        slides_per_patient: slides per patient (same label).
        size: level-0 edge of each square slide in pixels.
        mpp: level-0 microns per pixel (0.5 = 20x).
        downsamples: pyramid levels written.
        ring_radius_um: inner radius of the ring (keep > half the 10x field of view, 128 µm).
        texture_radius_um: radius of the texture / tint disc.
        compression: TIFF compression.
        seed: master seed.
        mask_mpp: resolution of the written lesion masks.
        cue_contrast: opacity factor of the texture dots and the ring (1 = the demo; lower is harder).
        texture_period_um: spacing of the fine texture's dots.
        ring_shape: ``circle`` or ``square`` (a square frame of the same radius and width).
        num_structures: structure slots per slide, laid out on a square grid (4 = 2x2).
        lesions_per_positive: lesions (``R+T``) in a positive slide, cue counts balanced between the classes
            (see :func:`_structure_kinds`); 0 = the demo's draw (one lesion, a second with probability 1/3).
        num_classes: 3 makes a three-class co-location cohort (:func:`_class_kinds`): the classes differ in which of
            two rings (``R``, ``Q``) surrounds the texture (2 = the binary demo).
        second_ring: what tells ring ``Q`` from ring ``R`` in a three-class cohort: ``square`` (a square frame of the
            same radius and colour) or ``colour`` (a circle of another colour, ``RING_2``).
        survival: a survival cohort (:func:`survival_outcome`): patient ``p`` holds ``p % (max_lesions + 1)``
            lesions (cue counts balanced as in the co-location cohorts), times shorten with that burden, some are
            censored; the manifest gets ``time`` and ``event`` (label = the burden, for reading only).
        stain_sites: > 0 spreads the patients over that many sites, each with its own H&E staining
            (:func:`site_stain`: the slide's H, E and residual concentrations scaled by ``1 ± stain_strength`` and
            shifted, fixed per site); sites hold every class equally, so the stain says nothing about the label.
        stain_strength: how far the sites' stains differ (see ``stain_sites``).
    """

    num_patients: int = 20
    slides_per_patient: int = 1
    size: int = 2560
    mpp: float = 0.5
    downsamples: Sequence[int] = (1, 2, 4, 8)
    ring_radius_um: float = 150.0
    ring_width_um: float = 60.0
    texture_radius_um: float = 120.0
    compression: str = "jpeg"
    seed: int = 0
    mask_mpp: float = 8.0
    cue_contrast: float = 1.0
    texture_period_um: float = 4.0
    ring_shape: str = "circle"
    num_structures: int = 4
    lesions_per_positive: int = 0
    num_classes: int = 2
    survival: bool = False
    second_ring: str = "square"
    stain_sites: int = 0
    stain_strength: float = 0.3

    def __post_init__(self) -> None:
        if self.second_ring not in ("square", "colour"):
            raise ValueError(f"second_ring must be 'square' or 'colour', got {self.second_ring!r}")
        if self.num_classes not in (2, 3):
            raise ValueError(f"num_classes must be 2 or 3, got {self.num_classes}")
        if self.num_classes == 3 and self.num_structures % 4:
            raise ValueError("a three-class cohort needs num_structures divisible by 4 (units of 4 structures)")
        if self.survival and self.num_classes != 2:
            raise ValueError("a survival cohort has no classes: leave num_classes at 2")
        if self.ring_shape not in ("circle", "square"):
            raise ValueError(f"ring_shape must be 'circle' or 'square', got {self.ring_shape!r}")
        if self.num_structures < 2 or not 0 <= self.lesions_per_positive <= self.num_structures:
            raise ValueError("need num_structures >= 2 and 0 <= lesions_per_positive <= num_structures")

    def to_dict(self) -> dict:
        """Parameters as plain values; the co-location knobs only when changed, so the demo's stamp (and
        hence every cache key derived from it) stays what it was before they existed."""
        d = asdict(self)
        d["downsamples"] = list(self.downsamples)
        for f in fields(self):
            if f.name in _LATER_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d


#: fields added after the first demo release (left out of :meth:`DemoParams.to_dict` at their defaults)
_LATER_FIELDS = ("cue_contrast", "texture_period_um", "ring_shape", "num_structures", "lesions_per_positive", "num_classes", "survival",
                 "second_ring", "stain_sites", "stain_strength")

#: co-location cohorts of the fusion ablation (docs/evaluation.md): the demo's label principle with other cue
#: sizes, contrasts, shapes, lesion counts and pyramid levels
COLOCATION_COHORTS: dict[str, dict] = {
    # 2 lesions per positive slide; every slide shows both cues elsewhere, apart (balanced kinds)
    "clean": {"size": 2048, "lesions_per_positive": 2, "cue_contrast": 1.4, "texture_radius_um": 80.0,
              "ring_radius_um": 170.0, "ring_width_um": 80.0},
    # fainter (contrast 1.2), larger and finer (5 µm period) texture, smaller ring
    "small2": {"size": 2048, "lesions_per_positive": 2, "cue_contrast": 1.2, "texture_radius_um": 90.0, "texture_period_um": 5.0,
               "ring_width_um": 100.0, "ring_radius_um": 150.0},
    # wider ring, demo texture
    "strong2": {"size": 2048, "lesions_per_positive": 2, "cue_contrast": 1.4, "ring_width_um": 100.0, "ring_radius_um": 160.0},
}

#: the stain measurement (docs/evaluation.md "Stain"): the 'clean' co-location cohort scanned at three sites
STAIN_COHORTS: dict[str, dict] = {
    "clean_sites": {**COLOCATION_COHORTS["clean"], "stain_sites": 3, "stain_strength": 0.4},
}

#: cohorts of the other tasks (docs/evaluation.md "Beyond binary"): three classes told apart by which ring shape
#: co-locates with the texture, and survival whose times shorten with the co-located lesion burden
TASK_COHORTS: dict[str, dict] = {
    # the 'clean' geometry (texture disc 80 µm, ring from 170 µm: a 20x field inside the disc never reaches the ring)
    "multiclass3": {"size": 2048, "num_classes": 3, "lesions_per_positive": 2, "second_ring": "colour", "cue_contrast": 1.4,
                    "texture_radius_um": 80.0, "ring_radius_um": 170.0, "ring_width_um": 80.0},
    "survival": {"size": 2048, "survival": True, "cue_contrast": 1.4, "texture_radius_um": 80.0, "ring_radius_um": 170.0,
                 "ring_width_um": 80.0},
    # measured before (docs/evaluation.md): the circle / square rings of multiclass3 (at chance for every model)
    "multiclass3_shape": {"size": 2048, "num_classes": 3, "lesions_per_positive": 2, "cue_contrast": 1.4, "texture_radius_um": 80.0,
                          "ring_radius_um": 170.0, "ring_width_um": 80.0},
    # measured first: one co-location in classes 1 and 2 only, and strong2's geometry, where a
    # 20x field at the texture disc's edge also holds the ring's inner edge
    "multiclass3_one_lesion": {"size": 2048, "num_classes": 3, "cue_contrast": 1.4, "ring_width_um": 100.0, "ring_radius_um": 160.0},
    "survival_strong2": {"size": 2048, "survival": True, "cue_contrast": 1.4, "ring_width_um": 100.0, "ring_radius_um": 160.0},
}


def _class_kinds(label: int, params: DemoParams, rng: np.random.Generator) -> list[str]:
    """Structure kinds of a three-class slide, in units of four (``R`` circular ring, ``Q`` square ring, ``T``
    texture, ``S`` plain tint). ``lesions_per_positive`` 2: every slide holds two co-locations, class 0 ``R+T, R+T,
    Q+S, Q+S`` (texture in circles), class 1 ``Q+T, Q+T, R+S, R+S`` (in squares), class 2 ``R+T, Q+T, R+S, Q+S``
    (one of each); otherwise class 0 ``T, T, R+S, Q+S`` (none), class 1 ``R+T, T, S, Q+S``, class 2 ``Q+T, T, R+S,
    S``. Either way every class shows the same numbers of textures, tints, circular and square rings: only which ring
    surrounds a texture (a 5x shape at the place of a 20x texture) tells the classes apart."""
    if params.lesions_per_positive >= 2:
        unit = {0: ["R+T", "R+T", "Q+S", "Q+S"], 1: ["Q+T", "Q+T", "R+S", "R+S"], 2: ["R+T", "Q+T", "R+S", "Q+S"]}[int(label)]
    else:
        unit = {0: ["T", "T", "R+S", "Q+S"], 1: ["R+T", "T", "S", "Q+S"], 2: ["Q+T", "T", "R+S", "S"]}[int(label)]
    kinds = unit * (params.num_structures // 4)
    rng.shuffle(kinds)
    return kinds


def survival_outcome(burden: int, rng: np.random.Generator) -> tuple[float, int]:
    """(time in months, event) of a patient with ``burden`` co-located lesions: log-normal event times whose median
    halves with each lesion (60, 30, 15 months; sd of log time 0.35), censored by a uniform follow-up of 12-84
    months (about a quarter censored)."""
    event_time = float(60.0 * 0.5 ** burden * np.exp(0.35 * rng.standard_normal()))
    follow_up = float(rng.uniform(12.0, 84.0))
    return (round(event_time, 2), 1) if event_time <= follow_up else (round(follow_up, 2), 0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float, coarse: int = 8) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], made on a coarse grid then upsampled (cheap)."""
    small = rng.standard_normal((shape[0] // coarse + 2, shape[1] // coarse + 2)).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma / coarse)
    small /= small.std() + 1e-6
    big = ndimage.zoom(small, coarse, order=1)[: shape[0], : shape[1]]
    return np.clip(big / 2.5, -1, 1)


def _disc(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= radius**2


def _dots(rng: np.random.Generator, shape: tuple[int, int], density: float, radius: float) -> np.ndarray:
    impulses = rng.random(shape, dtype=np.float32) < density
    return ndimage.binary_dilation(impulses, structure=_disc(radius))


def _texture(rng: np.random.Generator, shape: tuple[int, int], period: int) -> np.ndarray:
    """Jittered lattice of 1-px-radius dots (fine texture), as a float coverage map."""
    cov = np.zeros(shape, np.float32)
    ys = np.arange(period // 2, shape[0], period)
    xs = np.arange(period // 2, shape[1], period)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    gy = np.clip(gy + rng.integers(-1, 2, gy.shape), 0, shape[0] - 1)
    gx = np.clip(gx + rng.integers(-1, 2, gx.shape), 0, shape[1] - 1)
    cov[gy, gx] = 1.0
    return ndimage.binary_dilation(cov > 0, structure=_disc(1.2)).astype(np.float32)


def _structure_kinds(label: int, params: DemoParams, rng: np.random.Generator) -> list[str]:
    """Kinds of the structure slots, shuffled.

    The demo's draw (4 slots, ``lesions_per_positive`` 0) is kept bit for bit. Otherwise the cue counts are
    balanced so that only co-location tells the classes apart: a negative slide holds ``T`` and ``R+S`` in equal
    numbers; a positive one swaps ``L`` of each pair for a lesion ``R+T`` and a plain tint ``S`` (no ring, no
    texture), so both classes show the same number of textured discs and of rings.
    """
    n = params.num_structures
    if params.num_classes == 3:
        return _class_kinds(label, params, rng)
    if params.survival:  # ``label`` is the lesion burden
        kinds = ["R+T", "S"] * min(int(label), n // 2) + [("T", "R+S")[i % 2] for i in range(n - 2 * min(int(label), n // 2))]
        rng.shuffle(kinds)
        return kinds
    if params.lesions_per_positive == 0 and n == 4:
        kinds = ["R+T", "T", "R+S", str(rng.choice(["R+T", "T", "R+S"]))] if label else ["T", "R+S", "T", "R+S"]
    else:
        lesions = min((params.lesions_per_positive or 1) if label else 0, n // 2)
        kinds = ["R+T", "S"] * lesions + [("T", "R+S")[i % 2] for i in range(n - 2 * lesions)]
    rng.shuffle(kinds)
    return kinds


def render_slide(label: int, params: DemoParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render one slide: (level-0 RGB uint8, lesion mask at level 0 (bool), structure list)."""
    n = params.size
    px = 1.0 / params.mpp  # pixels per micron
    shape = (n, n)
    # pixel coordinates as a row and a column (broadcast where used: the same values as full grids, without them)
    xx = np.arange(n, dtype=np.float32)[None, :]
    yy = np.arange(n, dtype=np.float32)[:, None]
    # tissue: a blobby ellipse covering most of the slide (a rounder square when a 3x3 or larger grid of
    # structures must fit inside it)
    g = int(np.ceil(np.sqrt(params.num_structures)))
    p = 2 if g <= 2 else 4
    cx, cy = n / 2 + rng.uniform(-0.03, 0.03) * n, n / 2 + rng.uniform(-0.03, 0.03) * n
    ax, ay = n * rng.uniform(0.44, 0.48), n * rng.uniform(0.44, 0.48)
    field = np.abs((xx - cx) / ax) ** p + np.abs((yy - cy) / ay) ** p + 0.15 * _smooth_noise(rng, shape, n / 10)
    tissue = field < 1.0
    img = np.broadcast_to(BACKGROUND, (n, n, 3)).copy()
    shade = _smooth_noise(rng, shape, 80 * px)[..., None]
    np.copyto(img, STROMA + 14 * shade, where=tissue[..., None])
    nuclei = _dots(rng, shape, 1 / 900, 3.0 * px / 2) & tissue
    img[nuclei] = NUCLEUS + rng.normal(0, 6, (int(nuclei.sum()), 3)).astype(np.float32)

    # structure slots on a g x g grid (2x2 in the demo); kinds depend on the label
    kinds = _structure_kinds(label, params, rng)
    margin = 0.5 / g + (0.03 if g <= 2 else 0.06)
    lesion = np.zeros(shape, bool)
    structures = []
    tex_r, ring_r, ring_w = params.texture_radius_um * px, params.ring_radius_um * px, params.ring_width_um * px
    half = int(np.ceil(ring_r + ring_w + 2))
    for slot, kind in enumerate(kinds):
        sx = (margin + (1 - 2 * margin) * (slot % g) / (g - 1)) * n + rng.uniform(-0.03, 0.03) * n
        sy = (margin + (1 - 2 * margin) * (slot // g) / (g - 1)) * n + rng.uniform(-0.03, 0.03) * n
        # work in a window around the structure only
        x0, y0 = max(int(sx) - half, 0), max(int(sy) - half, 0)
        x1, y1 = min(int(sx) + half + 1, n), min(int(sy) + half + 1, n)
        win = img[y0:y1, x0:x1]
        dx, dy = xx[:, x0:x1] - sx, yy[y0:y1] - sy
        r = np.hypot(dx, dy)
        disc = np.clip(tex_r - r + 1, 0, 1)[..., None]  # anti-aliased disc
        if "T" in kind or "S" in kind:
            cov = _texture(rng, r.shape, period=int(round(params.texture_period_um * px)))
            if "S" in kind:  # same mean colour at coarse scale, no fine structure
                cov = ndimage.gaussian_filter(cov, 6 * px)
            a = disc * cov[..., None] * min(0.85 * params.cue_contrast, 1.0)
            win[:] = win * (1 - a) + DOT * a
        if "R" in kind or "Q" in kind:  # Q: the second ring of the three-class cohort (square, or another colour)
            square = params.ring_shape == "square" or ("Q" in kind and params.second_ring == "square")
            rr = np.maximum(np.abs(dx), np.abs(dy)) if square else r
            band = np.clip(1 - np.abs(rr - ring_r - ring_w / 2) / (ring_w / 2), 0, 1)[..., None] * min(0.7 * params.cue_contrast, 1.0)
            win[:] = win * (1 - band) + (RING_2 if "Q" in kind and params.second_ring == "colour" else RING) * band
        if kind in ("R+T", "Q+T"):
            lesion[y0:y1, x0:x1] |= r <= tex_r
        structures.append({"kind": kind, "centre_xy": [float(sx), float(sy)]})
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= 3  # in place: the values of 3 * noise without a second full-slide temporary
    img += noise
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img, lesion, structures


def site_of(patient: int, params: DemoParams) -> int | None:
    """The staining site of a patient (None without sites): consecutive groups of one patient per class share a site,
    so every site holds the classes equally."""
    if params.stain_sites <= 0:
        return None
    return (patient // max(2, params.num_classes)) % params.stain_sites


def site_stain(img: np.ndarray, site: int, params: DemoParams) -> np.ndarray:
    """``img`` (H x W x 3 uint8) as stained at ``site``: colour deconvolution with Ruifrok's H, E and DAB vectors,
    each concentration scaled by a site factor in ``1 ± stain_strength`` and shifted by up to ``stain_strength / 5``
    (tissue only: background stays white), recomposed. The factors are a pure function of the seed and the site."""
    import torch

    from scripts.features.stain import hed_jitter

    rng = np.random.default_rng([params.seed, 7919, site])
    alpha = rng.uniform(1 - params.stain_strength, 1 + params.stain_strength, 3)
    beta = rng.uniform(-params.stain_strength / 5, params.stain_strength / 5, 3)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).to(torch.float64)
    out = hed_jitter(x, torch.as_tensor(alpha)[None], torch.as_tensor(beta)[None], tissue_od=0.15)
    return out[0].permute(1, 2, 0).numpy().astype(np.uint8)


def generate_demo(dataset_dir: str | Path, params: DemoParams | None = None, progress: bool = True) -> Path:
    """Write the demo cohort (slides, lesion masks, ``manifest.csv``) into ``dataset_dir``; idempotent.

    The manifest is written last, atomically, with a ``demo.json`` stamp of the parameters: a folder with
    both and a matching stamp is complete and is left untouched.
    """
    params = params or DemoParams()
    root = Path(dataset_dir)
    manifest = root / "manifest.csv"
    stamp = root / "demo.json"
    key = stable_hash({"version": DEMO_VERSION, **params.to_dict()})
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return manifest
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    n_pos = params.num_patients // 2
    records = []
    info = {}
    jobs = [(p, s) for p in range(params.num_patients) for s in range(params.slides_per_patient)]
    outcomes = {}
    for p, s in tqdm(jobs, desc="demo slides", disable=not progress):
        label = int(p % 2 == 1 and p // 2 < n_pos) if params.num_patients > 1 else 1
        if params.num_classes == 3:
            label = p % 3
        if params.survival:  # label = lesion burden 0..num_structures // 2; the outcome is the patient's
            label = p % (params.num_structures // 2 + 1)
            outcomes.setdefault(p, survival_outcome(label, np.random.default_rng([params.seed, p, 1_000_003])))
        slide_id = f"demo-p{p:03d}-s{s}"
        rng = np.random.default_rng([params.seed, p, s])
        img, lesion, structures = render_slide(label, params, rng)
        site = site_of(p, params)
        if site is not None:
            img = site_stain(img, site, params)
        path = root / "slides" / f"{slide_id}.tif"
        write_pyramid(path, img, params.mpp, params.downsamples, compression=params.compression)
        f = int(round(params.mask_mpp / params.mpp))
        mask = lesion[: lesion.shape[0] // f * f, : lesion.shape[1] // f * f]
        mask = mask.reshape(mask.shape[0] // f, f, mask.shape[1] // f, f).mean(axis=(1, 3)) >= 0.5
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"{slide_id}.png")
        time, event = outcomes.get(p, (None, None))
        records.append(SlideRecord(slide_id, f"demo-p{p:03d}", str(path), label, None, None, time, event))
        info[slide_id] = {"label": label, "structures": structures, **({"time": time, "event": event} if params.survival else {}),
                          **({"site": site} if site is not None else {})}
    atomic_write_json(stamp, {"key": key, "params": params.to_dict(), "mask_mpp": params.mask_mpp, "slides": info})
    write_manifest(manifest, records)
    logger.info("demo cohort: %d slides (%s) in %s", len(records), f"{sum(r.event for r in records)} events" if params.survival
                else f"{sum(r.label > 0 for r in records)} not of class 0", root)
    return manifest
