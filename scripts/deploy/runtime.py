"""Loading the exported model repository (see :mod:`scripts.deploy.export`) for the Deploy application."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from scripts.deploy.export import CSMIL_DIR, EXPORT_FIX, MODEL_FILE, PROGRAM_FILE, load_csmil, load_encoder
from scripts.errors import BundleInputError
from scripts.wsi.tiling import TilingParams
from scripts.wsi.tissue import TissueParams


@dataclass
class DeployModels:
    """The repository at ``root``: settings, CS-MIL and the per-scale encoders (TorchScript, on the CPU)."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not (self.root / CSMIL_DIR / MODEL_FILE).is_file():
            raise BundleInputError(self.root, f"no {CSMIL_DIR}/{MODEL_FILE} in the model folder", EXPORT_FIX)
        missing = [d for d in self.settings["encoder_dirs"]
                   if not (self.root / d / MODEL_FILE).is_file() and not (self.root / d / PROGRAM_FILE).is_file()]
        if missing:
            raise BundleInputError(self.root, f"encoder model(s) missing: {', '.join(f'{d}/{MODEL_FILE}' for d in missing)}", EXPORT_FIX)

    @cached_property
    def _csmil(self) -> tuple[torch.jit.ScriptModule, dict, dict]:
        return load_csmil(self.root / CSMIL_DIR / MODEL_FILE)

    @property
    def settings(self) -> dict:
        """Pipeline settings stored with the model (scales, tiling, preprocessing, clustering, bags)."""
        return self._csmil[1]

    @property
    def metadata(self) -> dict:
        """The bundle's configs/metadata.json at export time."""
        return self._csmil[2]

    @property
    def network(self) -> torch.jit.ScriptModule:
        return self._csmil[0]

    @cached_property
    def encoders(self) -> list[torch.nn.Module]:
        """One per scale: TorchScript, or a torch.export program with its input layer (``model.pt2``)."""
        return [load_encoder(self.root / d) for d in self.settings["encoder_dirs"]]

    @cached_property
    def tiling(self) -> TilingParams:
        t = dict(self.settings["tiling"])
        return TilingParams(**{**t, "scales_mpp": tuple(t["scales_mpp"]), "tissue": TissueParams(**t["tissue"])})
