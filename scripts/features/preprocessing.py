"""The patch preprocessing: co-centred multi-scale reading, then the intensity chain, as MONAI transforms.

One definition for every place that makes features: the data stages (``preprocessing`` in configs/train.yaml),
inference and the Deploy export (built from the checkpoint's settings, :class:`scripts.checkpoint.trained.TrainedModel`)
and the Deploy app (from :func:`preprocessing_section` in the exported settings). The feature store hashes the
transforms' own settings (:func:`scripts.features.extraction.transform_signature`), so a change of any value
(patch size, mean/std, scales) makes new features, and a model refuses features made otherwise
(:func:`scripts.checkpoint.contract.check_features`). Extraction moves the intensity part onto the encoder's device
(:mod:`scripts.features.device_preprocessing`), with the same arithmetic.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd, Resized, ScaleIntensityRanged

from scripts.wsi.transforms import LoadMultiScaleRegiond

#: ImageNet statistics (the usual choice for ResNet features; match your encoder's pretraining)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scale_keys(scales_mpp: Sequence[float]) -> list[str]:
    """Item keys of the scales, finest first: ``scale_0``, ``scale_1``, ..."""
    return [f"scale_{i}" for i in range(len(scales_mpp))]


def patch_preprocessing(
    scales_mpp: Sequence[float], patch_size: int, backend: str = "openslide", read_cell_um: float = 1024.0,
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, stain: str | None = None,
    stain_target: dict | None = None,
) -> Compose:
    """Patches of every scale for items ``{"image": slide path, "location": level-0 centre}``: read co-centred at
    each scale's mpp (area-averaged from a finer level where the pyramid has none, grouped by ``read_cell_um``
    cells), resized to ``patch_size`` (a no-op after the reader's resampling), stain-normalised when ``stain`` names a
    method (``macenko``, ``reinhard``; ``stain_target``: its target values, default the method's standard reference:
    :mod:`scripts.features.stain`), scaled from [0, 255] to [0, 1], normalised by ``mean``/``std`` per channel,
    float32; one key per scale (:func:`scale_keys`)."""
    from scripts.features.stain import StainNormalized

    keys = scale_keys(scales_mpp)
    size = int(patch_size)
    staining = [StainNormalized(keys=keys, method=stain, target=stain_target)] if stain not in (None, "", "none") else []
    return Compose([
        LoadMultiScaleRegiond(keys=keys, scales_mpp=list(scales_mpp), patch_size=size, backend=backend, read_cell_um=read_cell_um,
                              resize=True),
        Resized(keys=keys, spatial_size=[size, size], mode="area"),
        *staining,
        ScaleIntensityRanged(keys=keys, a_min=0, a_max=255, b_min=0.0, b_max=1.0),
        NormalizeIntensityd(keys=keys, subtrahend=list(mean), divisor=list(std), channel_wise=True),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ])


def preprocessing_section(**values: Any) -> dict:
    """:func:`patch_preprocessing` with ``values`` as a MONAI config section (JSON), for the Deploy app's
    ``ConfigParser``."""
    plain = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()}
    return {"_target_": f"{__name__}.patch_preprocessing", **plain}
