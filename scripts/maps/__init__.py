"""Attention maps: rasterising per-patch values, PNG overlays, QuPath GeoJSON, pyramidal TIFF heatmaps."""
