"""Classes of a ``label_map`` and the number of network outputs of a task."""

from __future__ import annotations

from typing import Mapping

from scripts.errors import BundleInputError

#: what a model predicts: ``classification`` (the classes of ``label_map``: two or more) or ``survival``
TASKS = ("classification", "survival")


def class_names(label_map: Mapping[str, int]) -> list[str]:
    """Class names by index (0..K-1): for each index the first name of ``label_map`` that maps to it; the values
    must be exactly 0..K-1 with K >= 2."""
    values = sorted({int(v) for v in label_map.values()})
    if len(values) < 2 or values != list(range(len(values))):
        raise BundleInputError("--label_map", f"label_map {dict(label_map)} maps to {values}; classes must be numbered 0..K-1 with K >= 2",
                               "map the class names to 0, 1, ..., K-1, e.g. --label_map \"{'normal': 0, 'crohn': 1, 'uc': 2}\"")
    names: dict[int, str] = {}
    for name, v in label_map.items():
        names.setdefault(int(v), str(name))
    return [names[i] for i in range(len(values))]


def num_outputs(task: str, label_map: Mapping[str, int], survival_bins: int = 4) -> int:
    """Logits of the network: K classes, or the discrete time bins of survival (:mod:`scripts.tasks.survival`)."""
    if task == "survival":
        return int(survival_bins)
    if task != "classification":
        raise BundleInputError("--task", f"task {task!r} is not one of {list(TASKS)}", "use --task classification or --task survival")
    return len(class_names(label_map))


def prob_column(name: str) -> str:
    """The inference table's column of one class's probability."""
    return f"prob_{name}"
