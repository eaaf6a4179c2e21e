"""The MIL models, torchmil's layout: one base (:mod:`scripts.mil.base`), shared pooling and heads
(:mod:`scripts.mil.pooling`), one model per module and the registry by name (:mod:`scripts.mil.registry`). Bags live
in :mod:`scripts.data.bags`, the engine glue in :mod:`scripts.workflows.engine`, the checkpoint contract in
:mod:`scripts.checkpoint`."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
