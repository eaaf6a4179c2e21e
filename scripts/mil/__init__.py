"""Multiple-instance learning: bags drawn from phenotype clusters, CS-MIL network, batch helpers."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
