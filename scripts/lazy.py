"""Submodules imported on first attribute access, so ``$import scripts`` in the bundle config costs nothing
and an expression such as ``$scripts.evaluation.workflow.evaluate(...)`` imports only what it uses (PEP 562)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable


def lazy_submodules(package: str) -> Callable[[str], ModuleType]:
    """A module ``__getattr__`` for ``package`` that imports ``package.<name>`` when it is first accessed."""

    def __getattr__(name: str) -> ModuleType:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{package}.{name}":  # no such submodule (a missing dependency inside it is raised as is)
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            raise

    return __getattr__
