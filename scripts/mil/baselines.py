"""Kept for configs and code written before 0.16.0: the registry is :mod:`scripts.mil.registry` and each model has
its own module (:mod:`scripts.mil.attention_mil`, :mod:`scripts.mil.dsmil`)."""

from scripts.mil.attention_mil import AttentionMIL  # noqa: F401
from scripts.mil.dsmil import DSMIL  # noqa: F401
from scripts.mil.registry import MODELS, build_model  # noqa: F401
