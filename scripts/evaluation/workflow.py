"""``run evaluate``: protocol -> report (the ``evaluate`` component of configs/evaluate.yaml)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from scripts.config_values import as_bool
from scripts.environment import environment
from scripts.evaluation.protocol import make_variants, run_protocol
from scripts.evaluation.report import build_report, write_report
from scripts.features.store import FeatureEntry

logger = logging.getLogger(__name__)


def manifest_test_flags(entries: Sequence[FeatureEntry]) -> list[bool]:
    """True for entries whose manifest row has ``split == test``."""
    return [(e.split or "").lower() == "test" for e in entries]


def _selection_metric(result: Mapping[str, Any]) -> str | None:
    """The ``selection_metric`` that chose the runs' checkpoints (their training summaries; None for runs cached by a
    version before 0.22.0), for the report's text."""
    used = {r.get("selection_metric") for runs in result["runs"].values() for r in runs} - {None}
    return ", ".join(sorted(used)) or None


def evaluate(
    config: Mapping[str, Any] | str | Path, entries: Sequence[FeatureEntry], output_dir: str | Path, models: Sequence[str],
    reference: str = "csmil", train_overrides: Mapping[str, Any] | None = None, test_entries: Sequence[FeatureEntry] = (), num_splits: int = 10, val_fraction: float = 0.25, seed: int = 0,
    test_bags: int = 100, bootstrap_resamples: int = 2000, bootstrap_by_patient: bool = True,
    ablation_id: str | None = None, ablation_values: Sequence[Any] = (), ablation_models: Sequence[str] = ("csmil",),
    device: Any = "cpu", progress: bool = True, verbose: bool = False, workers: int = 1, task: str = "classification",
    class_names: Sequence[str] = ("0", "1"), ordinal: bool = False,
) -> dict[str, Path]:
    """Train and score every model variant on every split, then write ``<output_dir>/report.{json,md}`` and figures.

    Each run trains with ``config`` (a raw training config, e.g. the command's own, or a config file), with
    ``train_overrides`` applied and the run's split, model and protocol seed set. ``entries`` (the datalist) carry
    the manifest's labels, patients and ``split`` values (``test`` rows form an external test set).
    """
    t0 = time.perf_counter()
    bootstrap_by_patient, progress, verbose = as_bool(bootstrap_by_patient), as_bool(progress), as_bool(verbose)
    workers = int(workers)
    if not isinstance(config, Mapping):
        from monai.bundle import ConfigParser

        config = ConfigParser.load_config_files(config)
    config = {**config, **(train_overrides or {})}
    models = [models] if isinstance(models, str) else list(models)
    variants = make_variants(models, ablation_id, ablation_values, ablation_models)
    if reference not in [v.name for v in variants]:
        from scripts.errors import BundleInputError

        raise BundleInputError("--eval_reference", f"{reference!r} is not among the evaluated models {[v.name for v in variants]}",
                               "pass one of them, or add it to --eval_models")
    result = run_protocol(
        config, entries, variants, Path(output_dir) / "evaluation", num_splits, val_fraction, seed, test_entries,
        manifest_test_flags(entries), test_bags, device, progress, verbose, workers, task,
    )
    protocol = {"models": [v.name for v in variants], "test_bags": test_bags, "val_fraction": val_fraction, "workers": workers,
                "train_overrides": {k: str(v) for k, v in (train_overrides or {}).items()},
                "train_recipe": str(config.get("train_recipe", "shared")),
                "selection_metric": _selection_metric(result), "environment": environment()}
    if task == "survival":
        from scripts.evaluation.survival_report import build_survival_report

        report, key = build_survival_report(result, reference, bootstrap_resamples, seed, bootstrap_by_patient, protocol), "c_index"
    elif len(class_names) > 2:
        from scripts.evaluation.multiclass import build_multiclass_report

        report = build_multiclass_report(result, reference, class_names, as_bool(ordinal), bootstrap_resamples, seed, bootstrap_by_patient, protocol)
        key = "macro_auc"
    else:
        report, key = build_report(result, reference, bootstrap_resamples, seed, bootstrap_by_patient, protocol), "auc"
    report["protocol"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    files = write_report(report, Path(output_dir) / "report")
    ref = report["models"][reference]
    logger.info("%s: mean %s %.4f over %d splits; combined %s %.4f (report: %s)", reference, key, ref["mean"][key],
                len(result["splits"]), key, ref["combined"][key], files["md"])
    return files
