"""Attention maps: rasterising per-patch values, PNG overlays, QuPath GeoJSON, pyramidal TIFF heatmaps."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
