"""Evaluation protocol of the CS-MIL paper: metrics, statistics, figures and the report."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
