"""MONAI dictionary transforms for multi-scale patch reading (declared in the pipeline config, configs/train.yaml)."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.wsi.slide import SlideReader


class LoadMultiScaleRegiond(MapTransform):
    """Read the co-centred patches of one patch centre, one output key per scale (CHW uint8).

    Input items carry ``path_key`` (slide file), ``centre_key`` (level-0 x, y) and optionally ``mpp_key``.
    With ``resize=True`` (default) regions read from a finer level are area-averaged to the exact target
    scale here, where grouped reading shares one average per cell; with ``resize=False`` the raw regions
    are returned for a following ``Resized(mode="area")``. One :class:`SlideReader` per slide is kept
    open per worker process.

    Args:
        keys: output keys, one per entry of ``scales_mpp`` (finest first).
        scales_mpp: target µm per px of each key.
        patch_size: output patch edge after resizing.
        backend: WSI backend.
        max_open: slide handles kept open per worker.
        read_cell_um: > 0 reads through the chunk cache (the tiling's cell size, µm), see :class:`SlideReader`;
            0 reads patch by patch.
        resize: area-resample to ``patch_size`` here (see above).
    """

    def __init__(
        self,
        keys: KeysCollection,
        scales_mpp: Sequence[float],
        patch_size: int = 256,
        backend: str = "openslide",
        path_key: str = "path",
        centre_key: str = "centre",
        mpp_key: str = "mpp",
        max_open: int = 4,
        read_cell_um: float = 0.0,
        resize: bool = True,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != len(scales_mpp):
            raise ValueError(f"one key per scale expected: {self.keys} vs {list(scales_mpp)}")
        self.scales_mpp = [float(s) for s in scales_mpp]
        self.patch_size = int(patch_size)
        self.backend = backend
        self.path_key, self.centre_key, self.mpp_key = path_key, centre_key, mpp_key
        self.max_open = max_open
        self.read_cell_um = read_cell_um
        self.resize = resize
        self._open: dict[tuple, tuple[SlideReader, list]] = {}

    def _slide(self, path: str, mpp: float | None, force: bool = False) -> tuple[SlideReader, list]:
        key = (path, mpp, force)
        if key not in self._open:
            if len(self._open) >= self.max_open:
                old = next(iter(self._open))
                self._open.pop(old)[0].close()
            slide = SlideReader(path, backend=self.backend, mpp=mpp, read_cell_um=self.read_cell_um, mpp_force=force)
            self._open[key] = (slide, [slide.plan(s, self.patch_size) for s in self.scales_mpp])
        return self._open[key]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        mpp = d.get(self.mpp_key)
        mpp = None if mpp is None or (isinstance(mpp, float) and np.isnan(mpp)) else float(mpp)
        slide, plans = self._slide(str(d[self.path_key]), mpp, bool(d.get("mpp_force", False)))
        centre = tuple(float(v) for v in np.asarray(d[self.centre_key]).ravel()[:2])
        for key, plan in zip(self.keys, plans):
            patch = slide.read_patch(centre, plan) if self.resize else slide.read_region(centre, plan)
            d[key] = np.ascontiguousarray(np.moveaxis(patch, -1, 0))
        return d

    def __getstate__(self) -> dict:  # open handles never cross process boundaries
        state = self.__dict__.copy()
        state["_open"] = {}
        return state
