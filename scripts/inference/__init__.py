"""Slide inference: inputs (slide, folder or manifest), predictions and attention per patch and scale."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
