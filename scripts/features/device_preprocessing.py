"""Patch intensity preprocessing as the first layer of the encoder, run on the encoder's device.

The patch chain is MONAI transforms (``preprocessing`` in configs/train.yaml, :mod:`scripts.features.preprocessing`: the
multi-scale reader, then ``ScaleIntensityRanged``, ``NormalizeIntensityd``, ``EnsureTyped``). Extraction splits
it (:func:`split_transform`): loader workers run the reader and hand over uint8 patches (a quarter of the bytes
of float32), and the intensity transforms become a :class:`PatchNormalize` module in front of the encoder
(:class:`PreprocessedEncoder`). The module repeats MONAI's arithmetic in MONAI's order, so on the CPU the
features are bit-identical to running the transforms in the workers (tested). The Deploy export scripts the
wrapped encoder, so a TorchScript encoder takes the uint8 patches the reader makes.

Written here, not taken from a library: MONAI's transforms run per item on the host; no MONAI or torch layer
turns a declared transform chain into a batched, scriptable device module.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd, Resized, ScaleIntensityRanged

from scripts.errors import BundleInputError
from scripts.features.stain import StainNormalized
from scripts.wsi.transforms import LoadMultiScaleRegiond


class PatchNormalize(torch.nn.Module):
    """(B, C, H, W) uint8 or float patches -> float32: optional range scaling ``(x - a_min) / (a_max - a_min) *
    (b_max - b_min) + b_min`` (clipped to [b_min, b_max] with ``clip``), then optional per-channel
    ``(x - mean) / std``; the constants are non-persistent buffers (not in the state dict, so the encoder's
    weights hash is that of its backbone)."""

    def __init__(self, scale_range: Sequence[float] | None = None, clip: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        a_min, a_max, b_min, b_max = [float(v) for v in (scale_range or (0.0, 1.0, 0.0, 1.0))]
        self.scale = scale_range is not None
        self.clip = bool(clip)
        self.a_min, self.a_span, self.b_min, self.b_max, self.b_span = a_min, a_max - a_min, b_min, b_max, b_max - b_min
        self.normalize = mean is not None
        self.register_buffer("mean", torch.tensor(list(mean or [0.0]), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std or [1.0]), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.scale:  # MONAI ScaleIntensityRange, same operations in the same order
            x = (x - self.a_min) / self.a_span
            x = x * self.b_span + self.b_min
            if self.clip:
                x = torch.clamp(x, self.b_min, self.b_max)
        if self.normalize:  # MONAI NormalizeIntensity(channel_wise=True) with given subtrahend / divisor
            x = (x - self.mean) / self.std
        return x


class PreprocessedEncoder(torch.nn.Module):
    """``backbone(preprocess(stain(x)))``: an encoder that takes the reader's uint8 patches (TorchScript-able);
    ``stain`` is an optional stain normalisation (:mod:`scripts.features.stain`, scripted), first on the raw RGB."""

    def __init__(self, preprocess: torch.nn.Module, backbone: torch.nn.Module, stain: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.stain = stain if stain is not None else torch.nn.Identity()
        self.stain_method = str(getattr(stain, "method", "none")) if stain is not None else "none"
        self.preprocess = preprocess
        self.backbone = backbone
        self.includes_preprocessing = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(self.stain(x)).contiguous(memory_format=torch.channels_last))


def with_stain(encoder: torch.nn.Module, stain: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eager :class:`PreprocessedEncoder` with ``stain`` first (its other modules and provenance
    attributes shared, not copied)."""
    out = copy.copy(encoder)
    out._modules = dict(encoder._modules)
    out.stain = stain
    out.stain_method = str(stain.method)
    return out


def stain_of(encoder: torch.nn.Module) -> str:
    """The stain normalisation an encoder carries (``none`` for one without, or exported before 0.19)."""
    return str(getattr(encoder, "stain_method", "none"))


def includes_preprocessing(encoder: torch.nn.Module) -> bool:
    """Whether ``encoder`` already carries its preprocessing (eager or TorchScript :class:`PreprocessedEncoder`)."""
    return bool(getattr(encoder, "includes_preprocessing", False))


def split_transform(transform: Any) -> tuple[Any, PatchNormalize | None]:
    """``(worker_transform, device_module)`` of a declared patch chain.

    The trailing intensity transforms (``ScaleIntensityRanged``, ``NormalizeIntensityd`` with given per-channel
    subtrahend / divisor, ``EnsureTyped`` to float32) become one :class:`PatchNormalize`; a ``Resized`` right
    after a reader that already resamples to its size is a no-op and is dropped (it only turned uint8 into
    float). Anything else stays in the workers; a chain that cannot be split is returned whole with ``None``
    (the workers then hand over float patches, as before 0.13)."""
    if not isinstance(transform, Compose):
        return transform, None
    ts = list(transform.transforms)
    first = _first_intensity(ts)
    keep, scale, clip, mean, std, convertible, stain = [], None, False, None, None, True, None
    for i, t in enumerate(ts):
        if i < first:
            if isinstance(t, Resized) and _noop_resize(ts[:i], t):
                continue
            keep.append(t)
        elif isinstance(t, StainNormalized) and stain is None and scale is None and mean is None:
            stain = t.module()
        elif isinstance(t, ScaleIntensityRanged) and scale is None and mean is None:
            sc = t.scaler
            convertible = convertible and _float32(sc.dtype) and sc.a_max != sc.a_min
            both = sc.b_min is not None and sc.b_max is not None  # MONAI maps to [b_min, b_max] only with both
            scale = (sc.a_min, sc.a_max, sc.b_min if both else 0.0, sc.b_max if both else 1.0)
            clip = bool(sc.clip) and both
        elif isinstance(t, NormalizeIntensityd) and mean is None:
            n = t.normalizer
            if not (n.channel_wise and n.subtrahend is not None and n.divisor is not None and not n.nonzero and _float32(n.dtype)):
                convertible = False
            else:
                mean, std = [float(v) for v in n.subtrahend], [float(v) for v in n.divisor]
        elif isinstance(t, EnsureTyped) and all(_float32(v) for v in (t.dtype if isinstance(t.dtype, tuple) else (t.dtype,))):
            continue
        else:
            convertible = False
    if not convertible or (scale is None and mean is None):
        return transform, None
    module = PatchNormalize(scale, clip, mean, std)
    # the stain step, scripted once here: extraction, inference and the Deploy export run the same TorchScript code;
    # kept out of PatchNormalize's submodules (attach() puts it first in each encoder)
    module.__dict__["stain_module"] = torch.jit.script(stain) if stain is not None else None
    return Compose(keep), module


def _float32(dtype: Any) -> bool:
    return dtype is None or dtype in (torch.float32, "float32", "torch.float32") or str(dtype) == "<class 'numpy.float32'>"


def _first_intensity(ts: list) -> int:
    for i, t in enumerate(ts):
        if isinstance(t, (StainNormalized, ScaleIntensityRanged, NormalizeIntensityd)):
            return i
    return len(ts)


def _noop_resize(before: list, t: Resized) -> bool:
    readers = [r for r in before if isinstance(r, LoadMultiScaleRegiond)]
    size = [int(v) for v in t.resizer.spatial_size] if isinstance(t.resizer.spatial_size, (list, tuple)) else None
    return bool(readers) and readers[-1].resize and size == [readers[-1].patch_size] * 2 and set(t.keys) <= set(readers[-1].keys)


def attach(encoders: Sequence[torch.nn.Module], module: PatchNormalize | None) -> list[torch.nn.Module]:
    """Each encoder with ``module`` in front (one shared instance: it holds no parameters), unchanged where it
    already carries its preprocessing; without a device module, encoders that expect uint8 are refused."""
    if module is None:
        if any(includes_preprocessing(e) for e in encoders):
            raise BundleInputError(None, "the encoders take the reader's uint8 patches but the patch preprocessing cannot run on "
                                         "the device", "keep ScaleIntensityRanged / NormalizeIntensityd last in 'preprocessing'")
        return list(encoders)
    stain = getattr(module, "stain_module", None)
    method = str(stain.method) if stain is not None else "none"
    out, done = [], {}  # an encoder shared by the scales stays shared
    for e in encoders:
        if id(e) not in done:
            if not includes_preprocessing(e):
                done[id(e)] = PreprocessedEncoder(module, e, stain)
            elif stain_of(e) == method:  # e.g. the Deploy app's exported encoders, which carry it
                done[id(e)] = e
            elif stain_of(e) == "none" and not isinstance(e, torch.jit.ScriptModule):
                done[id(e)] = with_stain(e, stain)
            else:
                raise BundleInputError(None, f"the encoder carries stain normalisation '{stain_of(e)}' but the patch chain asks for "
                                             f"'{method}'", "export the model again with this bundle (run export)")
        out.append(done[id(e)])
    return out


def with_preprocessing(encoders: Sequence[torch.nn.Module], transform: Any) -> list[torch.nn.Module]:
    """Each encoder with the device part of ``transform`` in front (:func:`attach`)."""
    return attach(encoders, split_transform(transform)[1])
