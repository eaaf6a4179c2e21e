"""Benchmarks: each measures us and a baseline in the same run and prints a last line ``ratios: ...``.

Run ``python -m scripts.benchmarks <name> [--json F]``; names: ``read``, ``extract``, ``loader``,
``infer``, ``train``, ``evaluate``, ``scaling``, ``fusion``, ``startup``.
"""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
