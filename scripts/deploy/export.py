"""Export the model repository the MONAI Deploy application runs on (``models/deploy``).

Layout (MONAI Deploy's "named model" repository: one folder per model, one file per folder)::

    <deploy_dir>/csmil/model.ts          CS-MIL (TorchScript; ``forward`` and ``forward_attention``)
                                         + extra files settings.json (pipeline settings) and metadata.json
    <deploy_dir>/encoder_20x/model.ts    the patch encoder of each scale (TorchScript), finest first
    <deploy_dir>/encoder_10x/model.ts
    <deploy_dir>/encoder_5x/model.ts

``settings.json`` holds everything the application needs besides the weights (scales, tiling, the patch
preprocessing as a MONAI config section, clustering, bag sampling: :meth:`scripts.checkpoint.trained.TrainedModel.deploy_settings`,
from the checkpoint's contract), so the app never reads the bundle's configs and the exported models cannot drift
from the settings they were trained with.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from scripts import __version__
from scripts.cache import atomic_dir
from scripts.features.device_preprocessing import stain_of
from scripts.features.encoder_files import input_settings
from scripts.features.stain import stain_settings
from scripts.errors import BundleInputError
from scripts.inference.predict import scale_name
from scripts.checkpoint.contract import check_encoders

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
METADATA_FILE = "metadata.json"
CSMIL_DIR = "csmil"
MODEL_FILE = "model.ts"
#: an encoder exported with torch.export: the program and the settings of its input layer
PROGRAM_FILE = "model.pt2"
INPUT_FILE = "input.json"


def encoder_dirs(scales_mpp: Sequence[float]) -> list[str]:
    """Folder name of each scale's encoder: ``encoder_20x``, ``encoder_10x``, ``encoder_5x``."""
    return [f"encoder_{scale_name(m)}" for m in scales_mpp]


def _plain(value: Any) -> Any:
    """JSON-able copy of config values (tuples -> lists, numpy/torch scalars -> Python)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else list(o)))


def export_model_repository(
    deploy_dir: str | Path,
    network: torch.nn.Module,
    encoders: Sequence[torch.nn.Module],
    settings: Mapping[str, Any],
    meta_file: str | Path | None = None,
) -> Path:
    """Script CS-MIL and the per-scale encoders to TorchScript and write the repository atomically.

    Encoders that carry their preprocessing (:class:`scripts.features.device_preprocessing.PreprocessedEncoder`,
    as the pipeline config passes them) take the reader's uint8 patches (B, 3, H, W).

    Returns ``deploy_dir``. Each exported model is reloaded and checked against the eager one on a random input.
    """
    deploy_dir = Path(deploy_dir)
    settings = _plain(dict(settings))
    scales = settings["scales_mpp"]
    if len(encoders) != len(scales):
        raise BundleInputError(None, f"{len(encoders)} encoders for {len(scales)} scales", "give one encoder per scale")
    check_encoders(network, encoders, settings["encoder_arch"], deploy_dir)  # those the model's features came from
    contract = getattr(network, "csmil_contract", None)
    settings.update(bundle_version=__version__, encoder_dirs=encoder_dirs(scales), csmil_dir=CSMIL_DIR, contract=contract)
    metadata = json.loads(Path(meta_file).read_text()) if meta_file else {}
    network = network.cpu().eval()
    with atomic_dir(deploy_dir) as tmp:
        ts = torch.jit.script(network)
        (tmp / CSMIL_DIR).mkdir()
        extra = {SETTINGS_FILE: json.dumps(settings, indent=2, sort_keys=True), METADATA_FILE: json.dumps(metadata, indent=2)}
        torch.jit.save(ts, str(tmp / CSMIL_DIR / MODEL_FILE), _extra_files=extra)
        _check_network(network, tmp / CSMIL_DIR / MODEL_FILE, len(scales), settings["num_clusters"])
        for name, enc in zip(settings["encoder_dirs"], encoders):
            (tmp / name).mkdir()
            enc = enc.cpu().eval()
            if _scriptable(enc):
                torch.jit.save(torch.jit.script(enc), str(tmp / name / MODEL_FILE))
                _check_encoder(enc, tmp / name / MODEL_FILE, int(settings["patch_size"]))
            else:  # a torch.export program (TorchScript cannot hold it): the .pt2 file and its input settings
                shutil.copy2(enc.file_path, tmp / name / PROGRAM_FILE)
                inputs = input_settings(enc.preprocess)
                if stain_of(enc) != "none":  # the stain step goes with the program's input settings
                    inputs["stain"] = stain_settings(enc.stain)
                (tmp / name / INPUT_FILE).write_text(json.dumps(inputs, indent=2))
                _check_encoder(enc, tmp / name / PROGRAM_FILE, int(settings["patch_size"]))
        if deploy_dir.exists():  # replace an earlier export only once the new one is complete
            _remove_repository(deploy_dir)
    logger.info("exported the Deploy model repository to %s (%s + %s)", deploy_dir, CSMIL_DIR, ", ".join(settings["encoder_dirs"]))
    return deploy_dir


def _scriptable(enc: torch.nn.Module) -> bool:
    from scripts.features.encoder_files import ExportedProgram

    return not any(isinstance(m, ExportedProgram) for m in enc.modules())


def _remove_repository(path: Path) -> None:
    if not (path / CSMIL_DIR / MODEL_FILE).is_file():
        raise BundleInputError(path, "exists and is not a model repository this export wrote", "choose another --deploy_dir or remove it")
    shutil.rmtree(path)


@torch.inference_mode()
def _check_network(net: torch.nn.Module, path: Path, num_scales: int, num_clusters: int) -> None:
    ts = torch.jit.load(str(path))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, num_scales, num_clusters * 4, net.in_features, generator=g)
    mask = torch.rand(2, num_clusters * 4, generator=g) > 0.25
    torch.testing.assert_close(ts(x, mask), net(x, mask))
    torch.testing.assert_close(ts.forward_attention(x, mask)[1]["patch"], net.forward_attention(x, mask)[1]["patch"])


@torch.inference_mode()
def _check_encoder(enc: torch.nn.Module, path: Path, patch_size: int) -> None:
    ts = load_encoder(path.parent)
    g = torch.Generator().manual_seed(0)
    if getattr(enc, "includes_preprocessing", False):  # takes the reader's uint8 patches
        x = torch.randint(0, 256, (2, 3, patch_size, patch_size), generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(2, 3, patch_size, patch_size, generator=g)
    torch.testing.assert_close(ts(x), enc(x), rtol=1e-4, atol=1e-4)


def load_encoder(folder: Path) -> torch.nn.Module:
    """The encoder of one repository folder: ``model.ts`` (TorchScript), or ``model.pt2`` + ``input.json``."""
    folder = Path(folder)
    if (folder / PROGRAM_FILE).is_file():
        from scripts.features.encoder_files import encoder_from_parts

        return encoder_from_parts(json.loads((folder / INPUT_FILE).read_text()), folder / PROGRAM_FILE)
    return torch.jit.load(str(folder / MODEL_FILE), map_location="cpu").eval()


EXPORT_FIX = "export it with: python -m monai.bundle run export --config_file configs/deploy.yaml, and pass that folder with -m"


def load_csmil(model_file: str | Path) -> tuple[torch.jit.ScriptModule, dict, dict]:
    """An exported CS-MIL model (eval mode, CPU) with its ``settings.json`` and ``metadata.json``."""
    extra = {SETTINGS_FILE: "", METADATA_FILE: ""}
    try:
        net = torch.jit.load(str(model_file), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        raise BundleInputError(model_file, f"not a TorchScript model ({str(exc).splitlines()[0][:120]})", EXPORT_FIX) from exc
    if not extra[SETTINGS_FILE]:
        raise BundleInputError(model_file, "the model carries no settings.json", EXPORT_FIX)
    return net.eval(), json.loads(extra[SETTINGS_FILE]), json.loads(extra[METADATA_FILE] or "{}")


def load_settings(model_file: str | Path) -> dict:
    """``settings.json`` stored in an exported CS-MIL model file."""
    return load_csmil(model_file)[1]
