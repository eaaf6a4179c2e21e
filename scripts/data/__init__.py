"""Cohort description (manifests) and the deterministic demo cohort."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
