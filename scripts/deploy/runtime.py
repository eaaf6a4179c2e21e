"""Loading the exported model repository (see :mod:`scripts.deploy.export`) for the Deploy application."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from scripts.deploy.export import CSMIL_DIR, METADATA_FILE, MODEL_FILE, SETTINGS_FILE
from scripts.errors import BundleInputError
from scripts.wsi.tiling import TilingParams
from scripts.wsi.tissue import TissueParams

EXPORT_FIX = "export it with: python -m monai.bundle run export --config_file configs/deploy.yaml, and pass that folder with -m"


@dataclass
class DeployModels:
    """The repository at ``root``: settings, CS-MIL and the per-scale encoders (TorchScript, on the CPU)."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not (self.root / CSMIL_DIR / MODEL_FILE).is_file():
            raise BundleInputError(self.root, f"no {CSMIL_DIR}/{MODEL_FILE} in the model folder", EXPORT_FIX)
        missing = [d for d in self.settings["encoder_dirs"] if not (self.root / d / MODEL_FILE).is_file()]
        if missing:
            raise BundleInputError(self.root, f"encoder model(s) missing: {', '.join(f'{d}/{MODEL_FILE}' for d in missing)}", EXPORT_FIX)

    @cached_property
    def _csmil(self) -> tuple[torch.jit.ScriptModule, dict, dict]:
        extra = {SETTINGS_FILE: "", METADATA_FILE: ""}
        path = self.root / CSMIL_DIR / MODEL_FILE
        try:
            net = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except RuntimeError as exc:
            raise BundleInputError(path, f"not a TorchScript model ({str(exc).splitlines()[0][:120]})", EXPORT_FIX) from exc
        if not extra[SETTINGS_FILE]:
            raise BundleInputError(path, "the model carries no settings.json", EXPORT_FIX)
        return net.eval(), json.loads(extra[SETTINGS_FILE]), json.loads(extra[METADATA_FILE] or "{}")

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
    def encoders(self) -> list[torch.jit.ScriptModule]:
        return [torch.jit.load(str(self.root / d / MODEL_FILE), map_location="cpu").eval() for d in self.settings["encoder_dirs"]]

    @cached_property
    def tiling(self) -> TilingParams:
        t = dict(self.settings["tiling"])
        return TilingParams(**{**t, "scales_mpp": tuple(t["scales_mpp"]), "tissue": TissueParams(**t["tissue"])})
