"""Whole-slide image I/O: mpp-driven multi-scale reading, tissue detection, tiling."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
