"""The trained model's checkpoint: its contract (what it was trained with), the model built from it for inference
and the Deploy export, and the upgrade of checkpoints written before contracts existed."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
