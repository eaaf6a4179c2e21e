"""Patient-level, label-stratified splits with a leakage guard."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from scripts.errors import BundleInputError

logger = logging.getLogger(__name__)


def check_no_leakage(partitions: dict[str, Sequence[str]], patient_of: dict[str, str]) -> None:
    """Raise if one patient has slides in two partitions (``partitions`` maps name -> slide ids)."""
    owner: dict[str, str] = {}
    for name, slides in partitions.items():
        for sid in slides:
            pid = patient_of[sid]
            if owner.setdefault(pid, name) != name:
                raise BundleInputError(
                    f"slide {sid}", f"patient '{pid}' appears in both '{owner[pid]}' and '{name}'",
                    "assign all slides of a patient to one partition (fix the manifest's 'split' column)",
                )


def train_val_split(
    slide_ids: Sequence[str], patient_ids: Sequence[str], labels: Sequence[int], val_fraction: float = 0.25, seed: int = 0,
    fold: int = 0, given: Sequence[str | None] | None = None, where: str | None = None, require_classes: bool = True,
) -> tuple[list[int], list[int]]:
    """Indices of training and validation slides.

    Uses the manifest's ``split`` column when present (``train``/``val``), otherwise a patient-grouped,
    label-stratified fold (``StratifiedGroupKFold`` with ``round(1 / val_fraction)`` folds). ``labels`` are what the
    folds are stratified by (classes; the event for survival, where ``require_classes=False`` allows one value).
    """
    n = len(slide_ids)
    patient_of = dict(zip(slide_ids, patient_ids))
    classes = sorted(set(int(x) for x in labels))
    if len(classes) < 2 and require_classes:
        raise BundleInputError(where, f"all {n} slides have label {classes[0] if classes else '?'}: training needs slides of at least two classes",
                               "add slides of the other classes (check the manifest's label column and label_map)")
    if given is not None and any(given):
        tr = [i for i in range(n) if (given[i] or "train") == "train"]
        va = [i for i in range(n) if given[i] in ("val", "valid", "validation")]
    else:
        n_splits = max(2, int(round(1 / val_fraction)))
        n_pat = len(set(patient_ids))
        if n_pat < n_splits:
            raise BundleInputError(None, f"{n_pat} patients cannot make {n_splits} patient-level folds", "add patients or raise 'val_fraction'")
        per_class = {}
        for pid, lab in zip(patient_ids, labels):
            per_class.setdefault(lab, set()).add(pid)
        smallest = min(len(v) for v in per_class.values())
        if smallest < n_splits:
            raise BundleInputError(
                None, f"a class has only {smallest} patients: too few for {n_splits} stratified patient folds",
                "raise 'val_fraction' (e.g. --val_fraction 0.5), add patients, or give a 'split' column in the manifest",
            )
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        folds = list(sgkf.split(np.zeros(n), np.asarray(labels), groups=np.asarray(patient_ids)))
        tr, va = (list(map(int, f)) for f in folds[fold % n_splits])
    check_no_leakage({"train": [slide_ids[i] for i in tr], "val": [slide_ids[i] for i in va]}, patient_of)
    if not tr or not va:
        raise BundleInputError(where, "empty training or validation partition", "check the manifest's 'split' column or 'val_fraction'")
    for name, part in (("training", tr), ("validation", va)):
        if require_classes and len({int(labels[i]) for i in part}) < 2:
            logger.warning("the %s partition holds slides of one class only (%d slides): its AUC is undefined "
                           "(reported as null); add patients or change the split", name, len(part))
    return tr, va


def split_entries(entries: Sequence, val_fraction: float = 0.25, seed: int = 0, fold: int = 0, where: str | None = None,
                  task: str = "classification") -> dict[str, list]:
    """Split feature-store entries (each with its manifest record) into ``{"train": [...], "val": [...]}`` by patient,
    stratified by class (by event for ``task: survival``).

    The records' ``split`` values (the manifest's ``split`` column: ``train``/``val``) win when any is filled in;
    ``where`` (the manifest) is named in errors.
    """
    missing = [e.path for e in entries if e.record is None]
    if missing:
        raise ValueError(f"{missing[0]}: entries must carry their manifest record (labels never come from the cache)")
    ids = [e.slide_id for e in entries]
    given = [e.split for e in entries]
    tr, va = train_val_split(ids, [e.patient_id for e in entries], [e.label for e in entries], val_fraction, seed, fold,
                             given if any(given) else None, where=where, require_classes=task != "survival")
    return {"train": [entries[i] for i in tr], "val": [entries[i] for i in va]}


def _stratified_group_folds(labels: Sequence[int], patients: Sequence[str], n_splits: int, seed: int, what: str,
                            allow_one: bool = False) -> list[tuple[list[int], list[int]]]:
    """``StratifiedGroupKFold`` folds with a clear error when a class has fewer patients than folds."""
    per_class: dict[int, set] = {}
    for pid, lab in zip(patients, labels):
        per_class.setdefault(int(lab), set()).add(pid)
    if len(per_class) < 2 and not allow_one:
        raise BundleInputError(None, f"the {what} has a single class", "evaluation needs slides of at least two classes")
    smallest = min(len(v) for v in per_class.values())
    if smallest < n_splits:
        raise BundleInputError(
            None, f"a class of the {what} has only {smallest} patients: too few for {n_splits} patient-level splits",
            f"lower the number of splits (e.g. --eval_num_splits {max(2, smallest)}) or add patients",
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(list(map(int, a)), list(map(int, b))) for a, b in sgkf.split(np.zeros(len(labels)), np.asarray(labels), np.asarray(patients))]


def protocol_splits(
    slide_ids: Sequence[str], patient_ids: Sequence[str], labels: Sequence[int], num_splits: int = 10,
    val_fraction: float = 0.25, seed: int = 0, test: Sequence[bool] | None = None, allow_one_class: bool = False,
) -> list[dict[str, list[str]]]:
    """The evaluation protocol's ``num_splits`` patient-level, label-stratified splits (slide ids per partition).

    * External test set (``test`` marks its slides, e.g. a test manifest or ``split == test`` rows): the
      development slides are cut into ``num_splits`` patient folds; split ``i`` validates on fold ``i`` and
      trains on the rest (leave-one-fold-out, as the paper selects its 10 models); all splits share the test set.
    * No test set: cross-validation; split ``i`` tests on fold ``i`` and carves a validation set
      (``val_fraction`` of the patients, stratified) out of the remaining patients.

    Every split is checked for patient leakage between its partitions.
    """
    ids, pats, labs = list(slide_ids), list(patient_ids), [int(x) for x in labels]
    is_test = [bool(t) for t in test] if test is not None else [False] * len(ids)
    dev = [i for i in range(len(ids)) if not is_test[i]]
    ext = [ids[i] for i in range(len(ids)) if is_test[i]]
    patient_of = dict(zip(ids, pats))
    out = []
    folds = _stratified_group_folds([labs[i] for i in dev], [pats[i] for i in dev], num_splits, seed, "development cohort", allow_one_class)
    for k, (rest, held) in enumerate(folds):
        if ext:
            split = {"train": [ids[dev[j]] for j in rest], "val": [ids[dev[j]] for j in held], "test": ext}
        else:
            rest_idx = [dev[j] for j in rest]
            inner_n = max(2, int(round(1 / val_fraction)))
            inner = _stratified_group_folds([labs[i] for i in rest_idx], [pats[i] for i in rest_idx], inner_n, seed + 1 + k, "training part of a split",
                                           allow_one_class)
            tr, va = inner[0]
            split = {"train": [ids[rest_idx[j]] for j in tr], "val": [ids[rest_idx[j]] for j in va], "test": [ids[dev[j]] for j in held]}
        check_no_leakage(split, patient_of)
        out.append(split)
    return out
