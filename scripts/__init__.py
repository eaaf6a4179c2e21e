"""csmil-bundle: Cross-scale Attention Multi-Instance Learning (CS-MIL) as a MONAI bundle.

The package is imported by the bundle configs (``$import scripts``); each subpackage owns one concern:
``wsi`` (reading, tissue, tiling), ``data`` (manifests, demo cohort), ``features`` (encoders, store,
clustering), ``mil`` (bags, networks), ``workflows`` (stages, splits, handlers).
"""

__version__ = "0.28.2"

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
