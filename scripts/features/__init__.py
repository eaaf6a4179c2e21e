"""Patch encoders, the per-slide feature store, extraction and phenotype clustering."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
