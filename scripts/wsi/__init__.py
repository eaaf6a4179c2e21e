"""Whole-slide image I/O: mpp-driven multi-scale reading, tissue detection, tiling."""
