"""What a model predicts (``task``): classes of a label map (two or more; ordinal when declared) or survival (time to
event with censoring). :mod:`scripts.tasks.labels` names the classes and the network's outputs,
:mod:`scripts.tasks.survival` holds the survival loss, risk and concordance."""

from scripts.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
