"""Stage orchestration, patient-level splits and ignite handlers."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
