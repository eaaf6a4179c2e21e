"""Stain-augmented feature views for MIL training.

The MIL models train on stored features, so a stain augmentation of MIL training has to happen at extraction:
with ``stain_views: V`` (configs/train.yaml) the extract stage also encodes every slide V more times, each time
re-stained as a whole (one HED jitter per slide and view, :func:`scripts.features.stain.hed_jitter`: the H, E and
DAB concentrations scaled by ``1 ± sigma`` and shifted by ``± bias``), and each training bag then draws its
features from the original or from one of the views, at random. A view re-stains the whole slide with one set of
factors - what a slide scanned at another site looks like - rather than each patch on its own (Tellez et al. 2018
jitter patches; here the unit of MIL training is the slide). Validation, the protocol's test slides, inference and
the Deploy app see the original features only.

The views live beside the features in the slide's store entry, in ``stain_views-<hash>.npy`` (float16
[V, N, S, D]; the hash covers the settings below), written through a temporary name and renamed; the entry's own
hash and features are unchanged, so switching views on re-uses every stored feature and adds V encoder passes per
slide. The jitter runs on the encoder's device right before the encoders' input layer (stain normalisation, when
on, then applies to the re-stained patches, as it would to a slide from another site).

Defaults: ``sigma`` 0.2 (Tellez's "strong" scaling range) and ``bias`` 0.05 (Tellez's "light" shift: the strong shift
of 0.2 tints the white background, which a white-balanced scanner does not do).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scripts.cache import stable_hash
from scripts.errors import BundleInputError


@dataclass(frozen=True)
class StainViews:
    """How many stain views per slide and how strongly they are re-stained (see the module docstring)."""

    views: int
    sigma: float = 0.2
    bias: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.views) < 1:
            raise ValueError(f"stain views need views >= 1, got {self.views}")
        if not (0.0 <= float(self.sigma) <= 1.0 and float(self.bias) >= 0.0):
            raise ValueError(f"stain view jitter needs 0 <= sigma <= 1 and bias >= 0, got sigma={self.sigma}, bias={self.bias}")

    def settings(self) -> dict:
        return {"method": "hed_jitter", "views": int(self.views), "sigma": float(self.sigma), "bias": float(self.bias), "seed": int(self.seed)}

    @property
    def file_name(self) -> str:
        """The views' file inside a store entry."""
        return f"stain_views-{stable_hash(self.settings(), 10)}.npy"

    def factors(self, slide_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, beta)`` [V, 3] float64 of one slide: a pure function of the settings and the slide's id."""
        rng = np.random.default_rng([int(self.seed), int(stable_hash(slide_id, 8), 16), 4241])
        alpha = rng.uniform(1.0 - self.sigma, 1.0 + self.sigma, (self.views, 3))
        beta = rng.uniform(-self.bias, self.bias, (self.views, 3))
        return torch.from_numpy(alpha), torch.from_numpy(beta)


def stain_views(views: int, sigma: float = 0.2, bias: float = 0.05, seed: int = 0) -> StainViews | None:
    """The config's ``stain_views`` / ``stain_views_sigma`` / ``stain_views_bias`` as a :class:`StainViews` (None
    for 0 views)."""
    return StainViews(int(views), float(sigma), float(bias), int(seed)) if views else None


def views_path(entry_dir: str | Path, spec: StainViews) -> Path:
    return Path(entry_dir) / spec.file_name


def load_views(entry, spec: StainViews) -> np.ndarray:
    """float16 [V, N, S, D] of a feature entry; a missing file stops with the fix."""
    path = views_path(entry.path, spec)
    if not path.is_file():
        raise BundleInputError(path, f"slide '{entry.slide_id}' has no stain views for these settings {spec.settings()}",
                               "run the extract stage with the same stain_views / stain_views_sigma / stain_views_bias / seed (run training does it)")
    views = np.load(path)
    if views.shape[0] != spec.views or views.shape[1:] != tuple(entry.features().shape):
        raise BundleInputError(path, f"stain views of shape {list(views.shape)} do not match the slide's features "
                                     f"{list(entry.features().shape)} x {spec.views} views", "delete the file and run the extract stage again")
    return views
