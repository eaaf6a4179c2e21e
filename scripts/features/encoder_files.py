"""Exported encoders: a TorchScript module or a ``torch.export`` program (``.pt2``) as the patch encoder of a scale.

``encoder_arch`` names a built-in MONAI ResNet (``tiny``, ``resnet18``, ``resnet50``) or a file (one shared by all
scales, or a list with one per scale). The file is the whole network; nothing about it is declared by hand
except its preprocessing, which lives beside it in ``<stem>.preprocessing.json`` (docs/encoders.md)::

    {"input_size": 224, "resize_mode": "bicubic", "antialias": true,
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

Every field is optional: the input size is found by a probe forward (the patch size first, then common ViT
sizes), mean/std default to the config's ``normalize_mean`` / ``normalize_std``, the resize to bilinear with
antialiasing. The feature size and input dtype come from the probe too. The preprocessing runs on the device as
the encoder's first layer (:class:`EncoderInput`: uint8 patch -> [0, 1] -> resize to the input size -> mean/std ->
the encoder's dtype), so extraction, inference, the Deploy export and the Deploy app compute the same
features. The store's provenance hashes the file's bytes and the preprocessing, so a new encoder never reuses
old features.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from scripts.cache import file_sha256
from scripts.errors import BundleInputError, first_line

logger = logging.getLogger(__name__)

SUFFIXES = (".ts", ".pt", ".pth", ".jit", ".torchscript", ".pt2")
#: input sizes tried by the probe after the patch size (ViT-B/L/H and DINOv2 backbones)
PROBE_SIZES = (224, 256, 384, 518, 448, 512)
MODES = ("bilinear", "bicubic", "area", "nearest")


def is_encoder_file(arch: Any) -> bool:
    """Whether ``encoder_arch`` names file(s) rather than a built-in architecture."""
    if isinstance(arch, (list, tuple)):
        return bool(arch) and all(is_encoder_file(a) for a in arch)
    return isinstance(arch, (str, Path)) and (str(arch).endswith(SUFFIXES) or "/" in str(arch) or Path(str(arch)).is_file())


@dataclass(frozen=True)
class EncoderSpec:
    """What an exported encoder takes and gives (from its JSON and the probe)."""

    path: str
    sha256: str
    input_size: int
    feature_dim: int
    dtype: str = "float32"
    resize_mode: str = "bilinear"
    antialias: bool = True
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    value_range: float = 255.0
    declared: dict = field(default_factory=dict)


def preprocessing_file(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name[: -len(p.suffix)] + ".preprocessing.json") if p.suffix else p.with_name(p.name + ".preprocessing.json")


def load_module(path: str | Path) -> torch.nn.Module:
    """The network in ``path`` (TorchScript, or a ``torch.export`` program for ``.pt2``), on the CPU, in eval mode."""
    p = Path(path)
    if not p.is_file():
        raise BundleInputError(p, "encoder file not found", "pass an existing TorchScript (.ts) or torch.export (.pt2) file as --encoder_arch")
    try:
        if p.suffix == ".pt2":
            module = ExportedProgram(torch.export.load(str(p)).module())
        else:
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - wrong format, truncated, or saved with torch.save
        try:
            weights_only = isinstance(torch.load(str(p), map_location="cpu", weights_only=True), dict)
        except Exception:  # noqa: BLE001 - not a torch file at all
            weights_only = False
        if weights_only:
            raise BundleInputError(p, "cannot be loaded as an exported encoder: it holds a state dict (weights only, no network)",
                                   "export the network with torch.jit.save or torch.export.save (docs/encoders.md), or pass the "
                                   "weights as --encoder_weights with a built-in --encoder_arch") from None
        raise BundleInputError(p, f"cannot be loaded as an exported encoder ({type(err).__name__}: {first_line(err, 80)})",
                               "export it with torch.jit.save (TorchScript) or torch.export.save (.pt2): docs/encoders.md") from None
    return module.eval()


class ExportedProgram(torch.nn.Module):
    """A ``torch.export`` program's module as a child that ignores ``train()`` / ``eval()`` (exported programs
    refuse the switch; they run as they were exported, i.e. in eval mode)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.program = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> "ExportedProgram":
        self.training = mode
        return self


def _dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@functools.lru_cache(maxsize=4)
def _loaded(path: str, mtime: float) -> torch.nn.Module:
    """The network of one file version, loaded once per process (the probe and the encoders share it)."""
    return load_module(path)


@functools.lru_cache(maxsize=16)
def _spec(path: str, mtime: float, patch_size: int, mean: tuple, std: tuple) -> EncoderSpec:
    p = Path(path)
    declared: dict = {}
    jf = preprocessing_file(p)
    if jf.is_file():
        try:
            declared = json.loads(jf.read_text())
        except json.JSONDecodeError as err:
            raise BundleInputError(jf, f"is not valid JSON ({err.msg}, line {err.lineno})", "fix the encoder's preprocessing file") from None
        unknown = set(declared) - {"input_size", "resize_mode", "antialias", "mean", "std", "value_range"}
        if unknown:
            raise BundleInputError(jf, f"unknown field(s) {sorted(unknown)}", "use input_size, resize_mode, antialias, mean, std, value_range")
        if declared.get("resize_mode", "bilinear") not in MODES:
            raise BundleInputError(jf, f"resize_mode {declared['resize_mode']!r} is not one of {list(MODES)}", "choose one of them")
    module = _loaded(str(p), p.stat().st_mtime)
    dtype = _dtype(module)
    sizes = [int(declared["input_size"])] if "input_size" in declared else [patch_size, *[s for s in PROBE_SIZES if s != patch_size]]
    tried = []
    for size in sizes:
        try:
            with torch.inference_mode():
                out = module(torch.zeros(2, 3, size, size, dtype=dtype))
        except Exception as err:  # noqa: BLE001 - the probe: this input size does not fit
            tried.append(f"{size}: {type(err).__name__}")
            continue
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
            raise BundleInputError(p, f"returns {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} for "
                                      f"[2, 3, {size}, {size}], not [batch, features]",
                                   "export the backbone so that it returns one feature vector per patch (e.g. the class token): docs/encoders.md")
        return EncoderSpec(path=str(p), sha256=file_sha256(p), input_size=size, feature_dim=int(out.shape[1]), dtype=str(dtype).replace("torch.", ""),
                           resize_mode=declared.get("resize_mode", "bilinear"), antialias=bool(declared.get("antialias", True)),
                           mean=tuple(float(v) for v in declared.get("mean", mean)), std=tuple(float(v) for v in declared.get("std", std)),
                           value_range=float(declared.get("value_range", 255.0)), declared=declared)
    raise BundleInputError(p, f"no input size fits the encoder (tried {', '.join(tried)})",
                           f"declare it as input_size in {preprocessing_file(p).name} beside the file")


def encoder_spec(path: str | Path, patch_size: int = 256, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)) -> EncoderSpec:
    """Probe the exported encoder at ``path`` (cached per file version)."""
    p = Path(path).resolve()
    if not p.is_file():
        raise BundleInputError(path, "encoder file not found", "pass an existing TorchScript (.ts) or torch.export (.pt2) file as --encoder_arch")
    return _spec(str(p), p.stat().st_mtime, int(patch_size), tuple(float(v) for v in mean), tuple(float(v) for v in std))


def encoder_from_parts(input_settings: dict, program_file: str | Path) -> torch.nn.Module:
    """A ``.pt2`` encoder of the Deploy repository with its :class:`EncoderInput` (settings as exported)."""
    from scripts.features.device_preprocessing import PreprocessedEncoder
    from scripts.features.stain import build_stain

    settings = dict(input_settings)
    stain = settings.pop("stain", None)
    module = torch.jit.script(build_stain(stain.pop("method"), **stain)) if stain else None
    return PreprocessedEncoder(EncoderInput(**settings), load_module(program_file), module).eval()


class EncoderInput(torch.nn.Module):
    """uint8 (or float) patches [B, 3, H, W] -> the exported encoder's input: ``x / value_range``, resized to
    ``input_size`` when it differs, ``(x - mean) / std``, cast to the encoder's dtype. TorchScript-able."""

    def __init__(self, input_size: int, resize_mode: str = "bilinear", antialias: bool = True, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), value_range: float = 255.0, dtype: str = "float32") -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.resize_mode = str(resize_mode)
        self.antialias = bool(antialias) and resize_mode in ("bilinear", "bicubic")
        self.value_range = float(value_range)
        self.out_dtype = getattr(torch, dtype)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / self.value_range
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            if self.resize_mode in ("bilinear", "bicubic"):
                x = F.interpolate(x, size=[self.input_size, self.input_size], mode=self.resize_mode, align_corners=False, antialias=self.antialias)
            else:
                x = F.interpolate(x, size=[self.input_size, self.input_size], mode=self.resize_mode)
        x = (x - self.mean) / self.std
        return x.to(self.out_dtype)


def input_settings(module: torch.nn.Module) -> dict:
    """The settings of an :class:`EncoderInput`, eager or TorchScript (read from its attributes)."""
    dtype = module.out_dtype
    if isinstance(dtype, int):  # TorchScript keeps a dtype attribute as its ScalarType number
        dtype = {5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16}.get(dtype, torch.float32)
    return {"input_size": int(module.input_size), "resize_mode": str(module.resize_mode), "antialias": bool(module.antialias),
            "mean": module.mean.flatten().tolist(), "std": module.std.flatten().tolist(), "value_range": float(module.value_range),
            "dtype": str(dtype).replace("torch.", "")}


def build_file_encoder(path: str | Path, patch_size: int = 256, mean: Sequence[float] = (0.485, 0.456, 0.406),
                       std: Sequence[float] = (0.229, 0.224, 0.225)) -> torch.nn.Module:
    """The exported encoder with its :class:`EncoderInput` in front (a ``PreprocessedEncoder``)."""
    from scripts.features.device_preprocessing import PreprocessedEncoder

    spec = encoder_spec(path, patch_size, mean, std)
    enc = PreprocessedEncoder(EncoderInput(spec.input_size, spec.resize_mode, spec.antialias, spec.mean, spec.std, spec.value_range, spec.dtype),
                              _loaded(spec.path, Path(spec.path).stat().st_mtime))
    enc.file_sha256 = spec.sha256
    enc.file_name = Path(spec.path).name
    enc.file_path = spec.path
    logger.info("encoder %s (sha256 %s): input %d px %s, %d-d features, preprocessing %s", Path(spec.path).name, spec.sha256,
                spec.input_size, spec.dtype, spec.feature_dim, "from " + preprocessing_file(spec.path).name if spec.declared else "defaults")
    return enc.eval()
