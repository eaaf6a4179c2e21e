"""The checkpoint's contract: what a MIL model was trained with, stored inside ``models/model.pt``.

The contract rides in the state dict's metadata (``state_dict._metadata[""]["csmil_contract"]``, written by a
state-dict hook), so ``model.pt`` stays a plain state dict that MONAI's ``ckpt_export`` and
``torch.load(weights_only=True)`` read as before. It holds the settings that decide what the features mean
(scales, patch size, encoder architecture and weights, preprocessing), how bags are built (clusters), the label
map, the tiling, the model and the bundle version. Training records it (:func:`config_contract`, the ids of
:data:`SETTINGS` and :data:`TAKEN` of the training config); inference and the Deploy export build everything from
it (:class:`scripts.checkpoint.trained.TrainedModel`) and refuse a command-line setting that contradicts it with one
line naming both values (:func:`check_settings`, :func:`check_encoders`, :func:`check_features`). A weights-only checkpoint of 0.11 or earlier gets its contract
with ``python -m scripts.checkpoint.upgrade`` (:mod:`scripts.checkpoint.upgrade`).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from scripts.cache import stable_hash
from scripts.errors import BundleInputError, first_line

logger = logging.getLogger(__name__)

CONTRACT_KEY = "csmil_contract"
#: config ids compared between the checkpoint and the command
SETTINGS = ("mil_model", "scales_mpp", "patch_size", "num_clusters", "cluster_scale_mpp", "encoder_arch", "in_features", "task",
            "label_map", "ordinal", "survival_bins", "stain_normalization")
#: further ids recorded and taken by inference / export, but free to override (their effect is checked elsewhere:
#: encoders and preprocessing by hash, the rest only changes how bags are drawn)
TAKEN = ("seed", "encoder_weights", "encoder_weights_prefix", "normalize_mean", "normalize_std", "bag_per_cluster", "bag_replacement")
#: arguments of :func:`scripts.features.preprocessing.patch_preprocessing` recorded as training gave them
PREPROCESSING_ARGS = ("scales_mpp", "patch_size", "backend", "read_cell_um", "mean", "std", "stain", "stain_target")
#: configs/train.yaml's values of those ids (a checkpoint of 0.11 or earlier carries none; the Model Zoo's tools
#: build ``network_def`` from them before any model is trained); a test fails when the two drift
DEFAULTS: dict[str, Any] = {
    "mil_model": "dsmil", "scales_mpp": [0.5, 1.0, 2.0], "patch_size": 256, "num_clusters": 8, "cluster_scale_mpp": 2.0,
    "encoder_arch": "tiny", "task": "classification", "label_map": {"0": 0, "1": 1}, "ordinal": False, "survival_bins": 4, "stain_normalization": None, "seed": 0, "encoder_weights": None, "encoder_weights_prefix": "",
    "normalize_mean": [0.485, 0.456, 0.406], "normalize_std": [0.229, 0.224, 0.225], "bag_per_cluster": 8,
    "bag_replacement": False,
}


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """The state dict in a MIL checkpoint file (``weights_only=True``; a ``{"model": ...}`` wrapper unwrapped);
    a missing, unreadable or non-state-dict file raises a :class:`BundleInputError` naming it and the fix."""
    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        raise BundleInputError(ckpt_path, "is a folder, not a checkpoint file",
                               "pass --ckpt_path with the model.pt file itself (e.g. models/model.pt), not its folder")
    if not ckpt_path.is_file():
        raise BundleInputError(ckpt_path, "model checkpoint not found", "train first (python -m monai.bundle run training --config_file "
                                                                       "configs/train.yaml) or pass --ckpt_path")
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # not a torch file at all: the generic message below
            raise BundleInputError(ckpt_path, f"cannot be read as a model checkpoint ({type(err).__name__}: {first_line(err)})",
                                   "the file is truncated or not a checkpoint: copy models/model.pt again or train again") from None
        # a whole pickled object (e.g. torch.save(model)), not weights
        raise BundleInputError(
            ckpt_path, "holds a pickled Python object (e.g. torch.save(model)), not a state dict of weights, so it is not loaded "
            "(unpickling could run arbitrary code)",
            "save the weights instead: torch.save(model.state_dict(), 'model.pt'), or pass the model.pt written by run training") from None
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file, or holds more than weights
        raise BundleInputError(ckpt_path, f"cannot be read as a model checkpoint ({type(err).__name__}: {first_line(err)})",
                               "the file is truncated or not a checkpoint: copy models/model.pt again or train again") from None
    if not isinstance(state, dict):
        raise BundleInputError(ckpt_path, f"holds a {type(state).__name__}, not a state dict", "pass the model.pt written by run training")
    return state["model"] if isinstance(state.get("model"), dict) else state


def read_file(ckpt_path: str | Path) -> dict | None:
    """The contract of the checkpoint file, or None (missing, unreadable or from before 0.12.0)."""
    try:
        return read(read_checkpoint(ckpt_path))
    except BundleInputError:  # load_network reports it with the fix
        return None


def config_contract() -> dict:
    """The contract of the training config being evaluated (called from its ``model_contract`` expression): the
    values of :data:`SETTINGS` and :data:`TAKEN` and the tiling, read from the config itself (one table keyed by
    id, here, instead of a list of ids in the YAML)."""
    from scripts.workflows.command import current_parser

    parser = current_parser()
    values = {k: parser.get_parsed_content(k) for k in SETTINGS + TAKEN}
    # the patch preprocessing's own arguments (a nested override such as --preprocessing#read_cell_um reaches them)
    preprocessing = {k: parser.get_parsed_content(f"preprocessing#{k}") for k in PREPROCESSING_ARGS if f"preprocessing#{k}" in parser}
    return make_contract(**values, tiling=parser.get_parsed_content("tiling").to_dict(), preprocessing_args=preprocessing)


def make_contract(**settings: Any) -> dict:
    """The contract of the current settings (ids of :data:`SETTINGS`), JSON-friendly, plus the bundle version."""
    from scripts import __version__

    out = {k: _plain(v) for k, v in settings.items()}
    out["bundle_version"] = __version__
    return out


def features_provenance(entries: Sequence[Any]) -> dict:
    """Encoders (architecture, weights hash per scale) and preprocessing hash of the features in ``entries``."""
    if not entries:
        return {}
    meta = entries[0].meta
    return {"encoders": meta.get("encoders"), "preprocessing_hash": stable_hash(meta.get("preprocessing"), 16)}


def attach(network: torch.nn.Module, contract: Mapping[str, Any]) -> torch.nn.Module:
    """Make ``network``'s state dicts carry ``contract``; returns the network."""
    contract = dict(contract)

    def hook(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        local_metadata[CONTRACT_KEY] = contract

    network._register_state_dict_hook(hook)
    network.csmil_contract = contract
    return network


def read(state: Any) -> dict | None:
    """The contract stored in a loaded state dict, or None (checkpoints before 0.12.0)."""
    for meta in (getattr(state, "_metadata", None) or {}).values():
        if isinstance(meta, dict) and CONTRACT_KEY in meta:
            return dict(meta[CONTRACT_KEY])
    return None


def check_settings(contract: Mapping[str, Any] | None, current: Mapping[str, Any], ckpt_path: str | Path) -> None:
    """Refuse settings that differ from the checkpoint's (one line naming both values)."""
    if contract is None:
        logger.warning("%s: checkpoint from before 0.12.0 (no training contract): settings cannot be checked; "
                       "train again to record them", ckpt_path)
        return
    from scripts.features.encoder_files import is_encoder_file

    for key in SETTINGS:
        if key == "encoder_arch" and is_encoder_file(contract.get(key)) and is_encoder_file(current.get(key)):
            continue  # encoder files are compared by their bytes' hash (check_encoders), not by where they lie
        if key in contract and key in current and _plain(current[key]) != contract[key]:
            fix = (f"leave out --{key} (inference and export take the checkpoint's {_cli(contract[key])}) or use a checkpoint "
                   f"trained with {_cli(_plain(current[key]))}")
            if key == "in_features":
                fix = f"use the encoder the checkpoint was trained with (encoder_arch {contract.get('encoder_arch')!r})"
            raise BundleInputError(ckpt_path, f"the model was trained with {key} = {_cli(contract[key])} but this run has "
                                              f"{key} = {_cli(_plain(current[key]))}", fix)


def check_encoders(network: torch.nn.Module, encoders: Sequence[torch.nn.Module], arch: str, ckpt_path: str | Path) -> torch.nn.Module:
    """Refuse encoders other than those whose features the checkpoint was trained on, before any slide is
    encoded; returns ``network``."""
    contract = getattr(network, "csmil_contract", None)
    if contract and contract.get("encoders"):
        from scripts.features.encoders import encoder_signature

        now = [encoder_signature(e, arch) for e in encoders]
        if now != contract["encoders"]:
            raise BundleInputError(ckpt_path, f"the model was trained on features of encoders {_short(contract['encoders'])} but "
                                              f"this run's encoders are {_short(now)}",
                                   "use the encoder weights of training (--encoder_weights, --encoder_arch, --seed for random ones)")
    return network


def check_features(network: torch.nn.Module, entries: Sequence[Any], ckpt_path: str | Path) -> None:
    """Refuse features made by other encoder weights or preprocessing than the checkpoint's training features."""
    contract = getattr(network, "csmil_contract", None)
    if not contract or not entries or "encoders" not in contract:
        return
    now = features_provenance(entries)
    for e in entries:
        if features_provenance([e]) != now:
            raise BundleInputError(e.path, "feature entries of this run come from different encoders or preprocessing",
                                   "extract all slides with one encoder setup")
    if now.get("encoders") != contract["encoders"]:
        raise BundleInputError(ckpt_path, f"the model was trained on features of encoders {_short(contract['encoders'])} but "
                                          f"this run's features come from {_short(now.get('encoders'))}",
                               "use the encoder weights of training (--encoder_weights, --encoder_arch) for inference")
    if now.get("preprocessing_hash") != contract.get("preprocessing_hash"):
        raise BundleInputError(ckpt_path, "the model was trained on features with another patch preprocessing "
                                          f"({contract.get('preprocessing_hash')} vs {now.get('preprocessing_hash')})",
                               "use the preprocessing of training (patch_size, normalize_mean / normalize_std, transforms)")


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v) if isinstance(v, float) else int(v)
    return str(v)


def _cli(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_cli(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _short(encoders: Any) -> str:
    if not isinstance(encoders, list):
        return str(encoders)
    return ", ".join(f"{e.get('arch')}:{str(e.get('weights_sha'))[:8]}" for e in encoders if isinstance(e, dict))
