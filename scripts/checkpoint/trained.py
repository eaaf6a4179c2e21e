"""A trained model as inference and the Deploy export use it: everything built from the checkpoint's contract.

``configs/inference.yaml`` and ``configs/deploy.yaml`` read ``models/model.pt`` with one expression
(``trained: $scripts.checkpoint.trained.TrainedModel(@ckpt_path, ...)``) and take the network, the encoders, the patch
preprocessing, the tiling and the bag settings from it, so they declare no training setting. A setting given on
the command line is compared with the checkpoint: the ids of :data:`scripts.checkpoint.contract.SETTINGS` must agree (one
line naming both values otherwise), those of :data:`scripts.checkpoint.contract.TAKEN` (seed, encoder weights, ...)
replace the checkpoint's. Without a checkpoint (a fresh clone) the settings are the training config's defaults
(:data:`scripts.checkpoint.contract.DEFAULTS`), so the Model Zoo's tools can build ``network_def``; loading the weights
then says to train first.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import torch

from scripts.checkpoint import contract as contracts
from scripts.errors import BundleInputError

logger = logging.getLogger(__name__)


class TrainedModel:
    """The settings of the checkpoint at ``ckpt_path`` and what they build (see the module docstring)."""

    def __init__(self, ckpt_path: str | Path, overrides: Mapping[str, Any] | None = None) -> None:
        self.ckpt_path = Path(ckpt_path)
        self._state: tuple[tuple[int, int], dict] | None = None  # (file stamp, state dict): the weights read once
        self.contract = self._read_contract()
        stored = {k: v for k, v in (self.contract or {}).items() if k in contracts.DEFAULTS}
        overrides = {k: v for k, v in (overrides or {}).items() if k in contracts.DEFAULTS}
        if self.contract is None and self.ckpt_path.is_file():
            contracts.check_settings(None, overrides, self.ckpt_path)  # warns: a checkpoint of 0.11 or earlier
        if self.contract is not None:
            contracts.check_settings(self.contract, overrides, self.ckpt_path)
            logger.info("settings from the checkpoint %s: %s", self.ckpt_path,
                        ", ".join(f"{k}={contracts._cli(v)}" for k, v in stored.items()))
        self.overrides = overrides
        self.settings: dict[str, Any] = {**contracts.DEFAULTS, **stored, **overrides}

    def _stamp(self) -> tuple[int, int]:
        st = self.ckpt_path.stat()
        return st.st_mtime_ns, st.st_size

    def _read_contract(self) -> dict | None:
        """The checkpoint's contract (None: no file, an unreadable one, or one from before 0.12.0); the state dict
        read for it is kept for :meth:`network`, so the file is read once."""
        if not self.ckpt_path.is_file():
            return None
        try:
            stamp = self._stamp()
            state = contracts.read_checkpoint(self.ckpt_path)
        except BundleInputError:  # network() reports it with the fix
            return None
        self._state = (stamp, state)
        return contracts.read(state)

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(name)

    @cached_property
    def in_features(self) -> int:
        """Patch feature size D (the checkpoint's; probed from the encoder when it has none)."""
        if self.contract and self.contract.get("in_features") and "encoder_arch" not in self.overrides:
            return int(self.contract["in_features"])
        from scripts.features.encoders import feature_dim

        return feature_dim(self.encoder_arch, self.patch_size)

    @property
    def num_scales(self) -> int:
        return len(self.scales_mpp)

    @property
    def cluster_scale_index(self) -> int:
        return [float(s) for s in self.scales_mpp].index(float(self.cluster_scale_mpp))

    @property
    def num_outputs(self) -> int:
        """Logits of the network: the classes of ``label_map``, or the survival time bins."""
        from scripts.tasks.labels import num_outputs

        return num_outputs(self.task, self.label_map, self.survival_bins)

    @property
    def class_names(self) -> list[str]:
        """Class names by index (``label_map``; survival models have none)."""
        from scripts.tasks.labels import class_names

        return [] if self.task == "survival" else class_names(self.label_map)

    @property
    def survival_cuts(self) -> list[float] | None:
        """The time-bin edges of a survival model (from training's event times)."""
        return (self.contract or {}).get("survival_cuts")

    def network_def(self) -> torch.nn.Module:
        """A fresh network of the trained architecture (``network_def`` of the Zoo's tools)."""
        from scripts.mil.registry import build_model

        return build_model(self.mil_model, in_features=self.in_features, num_scales=self.num_scales, num_clusters=self.num_clusters,
                           num_classes=self.num_outputs)

    def network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The trained network, weights loaded (``weights_only``), in eval mode on ``device``; its contract is kept
        as ``network.csmil_contract``. A missing file says to train first."""
        from scripts.inference.predict import load_network

        kept, self._state = self._state, None
        state = kept[1] if kept is not None and self.ckpt_path.is_file() and self._stamp() == kept[0] else None  # unchanged file
        return load_network(self.network_def(), self.ckpt_path, device, state=state)

    def encoders(self) -> list[torch.nn.Module]:
        """The patch encoder of each scale, as extraction built them for training (built once per object)."""
        from scripts.features.encoders import build_scale_encoders

        if "_encoders" not in self.__dict__:
            self._encoders = build_scale_encoders(
                self.encoder_arch, self.num_scales, self.encoder_weights, seed=self.seed, prefix=self.encoder_weights_prefix,
                patch_size=self.patch_size, mean=self.normalize_mean, std=self.normalize_std)
        return self._encoders

    def checked_network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """:meth:`network`, after the encoders of this run were compared with those the model was trained on
        (before any slide is encoded)."""
        net = self.network(device)
        return contracts.check_encoders(net, self.encoders(), self.encoder_arch, self.ckpt_path)

    def tiling(self, backend: str | None = None):
        """The patch grid of training (:class:`scripts.wsi.tiling.TilingParams`), read with ``backend``."""
        from scripts.wsi.tiling import TilingParams
        from scripts.wsi.tissue import TissueParams

        recorded = dict((self.contract or {}).get("tiling") or {})
        if recorded:
            recorded["tissue"] = TissueParams(**recorded.get("tissue", {}))
            recorded.update(scales_mpp=list(self.scales_mpp), patch_size=int(self.patch_size))
        else:  # checkpoints of 0.14 and earlier: training's tiling defaults
            recorded = {"scales_mpp": list(self.scales_mpp), "patch_size": int(self.patch_size), "seed": int(self.seed)}
        if backend:
            recorded["backend"] = backend
        return TilingParams(**recorded)

    def preprocessing_args(self, backend: str | None = None) -> dict:
        """The arguments of :func:`scripts.features.preprocessing.patch_preprocessing` training used (recorded since
        0.15.0; else derived from the settings and tiling), read with ``backend`` when given."""
        tiling = self.tiling(backend)
        args = dict(scales_mpp=list(self.scales_mpp), patch_size=int(self.patch_size), backend=tiling.backend,
                    read_cell_um=tiling.read_cell_um, mean=list(self.normalize_mean), std=list(self.normalize_std))
        recorded = dict((self.contract or {}).get("preprocessing_args") or {})
        args.update({k: v for k, v in recorded.items() if k not in ("scales_mpp", "patch_size")})
        if backend:
            args["backend"] = backend
        for key, setting in (("mean", "normalize_mean"), ("std", "normalize_std")):
            if setting in self.overrides:  # a free setting given on the command line wins
                args[key] = list(self.overrides[setting])
        return args

    def preprocessing(self, backend: str | None = None):
        """The patch preprocessing of training (:func:`scripts.features.preprocessing.patch_preprocessing`)."""
        from scripts.features.preprocessing import patch_preprocessing

        return patch_preprocessing(**self.preprocessing_args(backend))

    def deploy_settings(self, backend: str | None = None, **runtime: Any) -> dict:
        """What the MONAI Deploy app needs besides the weights (scales, tiling, the preprocessing as a config section,
        clustering, bags) plus ``runtime`` (num_bags, threshold, map resolutions, feature_batch_size)."""
        from scripts.features.extraction import transform_signature
        from scripts.features.preprocessing import preprocessing_section, scale_keys

        tiling = self.tiling(backend)
        values = self.preprocessing_args(backend)
        return {
            "scales_mpp": list(self.scales_mpp), "patch_size": int(self.patch_size), "scale_keys": scale_keys(self.scales_mpp),
            "tiling": tiling.to_dict(), "encoder_arch": self.encoder_arch, "preprocessing": preprocessing_section(**values),
            "preprocessing_signature": transform_signature(self.preprocessing(backend)), "num_clusters": int(self.num_clusters),
            "cluster_scale_index": self.cluster_scale_index, "bag_per_cluster": int(self.bag_per_cluster), "bag_replacement": bool(self.bag_replacement),
            "seed": int(self.seed), "task": self.task, "class_names": self.class_names,
            **runtime,
        }
