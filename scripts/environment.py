"""The software whose versions decide a run's numbers, recorded beside the numbers.

Within one environment the protocol is bit-identical run to run (checked: docs/evaluation.md); across environments
it is not. torch's float32 kernels round differently by CPU (the AVX2 and AVX-512 code paths: 1e-6 in a trained weight
of the tiny demo, which training can grow), the demo's slides are JPEG tiles (imagecodecs' libjpeg-turbo writes them,
OpenSlide's decodes them), K-means and the statistics come from scikit-learn, SciPy and lifelines, and only torch and
MONAI are pinned by the install commands. A report that names these lets a reader tell a changed result from a
changed library or machine.
"""

from __future__ import annotations

import platform
from importlib import metadata

#: distributions whose versions change pixels, features, clusters, training or statistics
PACKAGES = ("torch", "monai", "numpy", "scipy", "scikit-learn", "pytorch-ignite", "tifffile", "imagecodecs", "openslide-python",
            "openslide-bin", "pillow", "lifelines")


def environment() -> dict[str, str]:
    """``{"python": ..., <distribution>: <version>, ...}``; a distribution that is not installed is left out, and
    the native libraries that decode the slides are added where their bindings report them (``libopenslide``,
    ``libjpeg_turbo`` of imagecodecs)."""
    out = {"python": platform.python_version(), "cpu_capability": _cpu_capability()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import openslide

        out["libopenslide"] = str(openslide.__library_version__)
    except Exception:  # noqa: BLE001 - OpenSlide missing or its library not loadable: nothing to record
        pass
    try:
        import imagecodecs

        out["libjpeg_turbo"] = str(imagecodecs.version(dict).get("libjpeg_turbo", ""))
    except Exception:  # noqa: BLE001 - imagecodecs missing or without a version table
        pass
    return {k: v for k, v in out.items() if v}


def _cpu_capability() -> str:
    """The vector ISA torch's CPU kernels use here (``AVX512``, ``AVX2``, ...), or "" when torch cannot say."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an older torch without the query
        return ""
