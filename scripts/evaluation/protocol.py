"""The paper's evaluation protocol: every model variant trained on the same patient-level splits with the
same hyper-parameters, each split's model chosen by validation loss, test slides scored with R random bags.

Each (variant, split) run parses the command's own config again (``configs/train.yaml`` with the command's other
overlays and command line, handed over as a raw config by :func:`scripts.workflows.command.current_config`) with
the split's slides, the protocol seed and the variant's network and overrides, so ``run evaluate`` trains exactly
what ``run training`` trains. A run lives in ``<output>/runs/<variant>/split_<i>-<hash>``: the hash covers everything the run depends on (features,
clusters, split, model, overrides), the directory is filled under a ``.partial`` name and renamed when its
predictions are written, so an interrupted evaluation resumes at the first unfinished run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from monai.bundle import ConfigParser
from tqdm import tqdm

from scripts.cache import stable_hash
from scripts.features.store import FeatureEntry
from scripts.inference.outputs import entry_localisation
from scripts.inference.predict import bag_probability, load_network, mean_probabilities, patch_attention, scale_name
from scripts.mil.registry import MODELS
from scripts.workflows.splits import protocol_splits

logger = logging.getLogger(__name__)

#: loggers silenced (to WARNING) while the protocol's many runs train, unless ``verbose``
_CHATTY = ("ignite", "StatsHandler", "monai.handlers.StatsHandler", "csmil.training", "monai.handlers", "scripts.workflows.stages")


#: ids of a command's config that do not change what a run trains (left out of the run's cache key)
RUN_INDEPENDENT = ("output_dir", "ckpt_dir", "log_dir", "progress", "num_workers", "_meta_", "initialize", "run", "evaluate",
                   "train_overrides", "ablation_id", "ablation_values", "ablation_models")


#: nested ids (``section#item``) that only report or guard and do not change what a finished run trains: the
#: one-line error handlers, the divergence guard (it stops a run or leaves it untouched; only finished runs are
#: cached) and the MLflow artefact upload. ``train#handlers`` is not among them: a user may add a handler there
#: that changes training (early stopping).
RUN_NEUTRAL_ITEMS = ("train#errors", "train#loss_guard", "train#artifacts", "validate#errors")


def run_config_key(config: Mapping[str, Any]) -> dict:
    """The part of a raw config a run's result depends on (for the run cache's key): the config without
    :data:`RUN_INDEPENDENT`, the ``eval_*`` ids and :data:`RUN_NEUTRAL_ITEMS`, so an edit of a message or of the
    guard reuses the finished runs."""
    key = {k: v for k, v in config.items() if k not in RUN_INDEPENDENT and not k.startswith("eval_")}
    for path in RUN_NEUTRAL_ITEMS:
        section, item = path.split("#")
        if isinstance(key.get(section), Mapping) and item in key[section]:
            key[section] = {k: v for k, v in key[section].items() if k != item}
    return key


@dataclass(frozen=True)
class Variant:
    """One row of the report: a model of :data:`scripts.mil.registry.MODELS` plus ``train.yaml`` overrides."""

    name: str
    model: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


def make_variants(models: Sequence[str], ablation_id: str | None = None, ablation_values: Sequence[Any] = (),
                  ablation_models: Sequence[str] = ("csmil",)) -> list[Variant]:
    """``models`` as variants, plus one variant per ablation value (``<model>[<id>=<value>]``) of each
    ``ablation_models`` entry, e.g. bag sizes ``bag_per_cluster=[64, 16, 8, 1]`` (the paper's Table 4)."""
    unknown = [m for m in [*models, *(ablation_models if ablation_id else [])] if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    out = [Variant(m, m) for m in models]
    if ablation_id:
        out += [Variant(f"{m}[{ablation_id}={v}]", m, {ablation_id: v}) for m in ablation_models for v in ablation_values]
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate variants: {names}")
    return out


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence per-epoch logs of the many runs: a filter (MONAI's ``get_logger`` resets levels to INFO for
    every new StatsHandler) plus the level (children such as ``ignite.engine.engine.SupervisedTrainer``)."""
    loggers = [logging.getLogger(name) for name in _CHATTY]
    levels = [lg.level for lg in loggers]
    flt = _BelowWarning()
    if enabled:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
            lg.addFilter(flt)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
            lg.removeFilter(flt)


def _worker_init(threads: int, verbose: bool, flush_denormal: bool = True) -> None:
    import torch

    torch.set_flush_denormal(flush_denormal)  # first: the worker's torch threads inherit it when they start
    torch.set_num_threads(threads)
    if not verbose:
        _quiet(True).__enter__()  # for the worker's lifetime


def _entry_key(e: FeatureEntry) -> list:
    """What a run depends on of a slide: its features and clusters, and the manifest's patient and label (time and
    event for survival): a run cached under an old label is never served."""
    key = [e.path.name, e.cluster_params(), e.patient_id, e.label]
    return key if e.record is None or e.record.time is None else key + [e.record.time, e.record.event]


def slide_score(network: Any, entry: FeatureEntry, task: str, num_outputs: int, k: int, m: int, test_bags: int, replacement: bool,
                seed: int, device: Any) -> float | list[float]:
    """What the report scores of a slide: P(class 1) (two classes), the class probabilities (K > 2), the risk (survival)."""
    if task == "survival":
        from scripts.tasks.survival import risk

        return float(risk(mean_probabilities(network, entry, k, m, test_bags, replacement, seed, device)))
    if num_outputs > 2:
        return mean_probabilities(network, entry, k, m, test_bags, replacement, seed, device)
    return bag_probability(network, entry, k, m, test_bags, replacement, seed, device)


def run_one(
    config: Mapping[str, Any], variant: Variant, split: Mapping[str, Sequence[FeatureEntry]], run_dir: Path, test_bags: int,
    seed: int, device: Any = "cpu",
) -> dict:
    """Train ``variant`` on one split (the raw training ``config``, its ``training`` run with ``seed``), reload its
    best checkpoint (``selection_metric``: validation loss, c-index for survival) and score the split's validation and test slides (cached in ``run_dir``)."""
    done = run_dir / "predictions.json"
    if done.is_file():
        return json.loads(done.read_text())
    tmp = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parser = ConfigParser(copy.deepcopy(dict(config)))
    for key, value in variant.overrides.items():
        parser[key] = value
    parser["seed"] = int(seed)
    parser["split"] = {"train": list(split["train"]), "val": list(split["val"])}
    parser["mil_model"] = variant.model
    parser["output_dir"], parser["ckpt_dir"], parser["progress"] = str(tmp), str(tmp), False
    parser.get_parsed_content("training")
    network = load_network(parser.get_parsed_content("network"), tmp / "model.pt", device)
    k, m = parser.get_parsed_content("num_clusters"), parser.get_parsed_content("bag_per_cluster")
    replacement = parser.get_parsed_content("bag_replacement")
    summary = json.loads((tmp / "training_summary.json").read_text())
    task, n_out = parser.get_parsed_content("task"), parser.get_parsed_content("num_outputs")
    result = {
        "variant": variant.name,
        "best": summary.get("best"),
        "selection_metric": summary.get("selection_metric"),
        **{
            part: {e.slide_id: slide_score(network, e, task, n_out, k, m, test_bags, replacement, seed, device) for e in split[part]}
            for part in ("val", "test")
        },
    }
    loc = localisation_on_test_slides(network, split["test"], k, parser.get_parsed_content("dataset_dir"),
                                      parser.get_parsed_content("scales_mpp"), device, task, n_out)
    if loc:
        result["localisation"] = loc
    (tmp / "predictions.json").write_text(json.dumps(result, indent=1))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    tmp.rename(run_dir)
    return result


def localisation_on_test_slides(network: Any, entries: Sequence[FeatureEntry], num_clusters: int, dataset_dir: str | Path,
                                scales_mpp: Sequence[float], device: Any = "cpu", task: str = "classification",
                                num_outputs: int = 2) -> dict[str, float]:
    """Mean per-scale localisation AUROC of the network's patch attention against the lesion masks of the positive
    test slides (``<dataset_dir>/masks/<slide's folder name>.png``, :mod:`scripts.data.ids`, as the demo and co-location cohorts have); empty when
    there are no masks or the network has no attention (``forward_attention``). K > 2 classes: the slides of classes
    other than 0, with the maps of their true class; survival: every slide with a lesion, maps of the earliest bin."""
    masks = Path(str(dataset_dir)) / "masks"
    if not hasattr(network, "forward_attention") or not masks.is_dir():
        return {}
    scales = [scale_name(m) for m in scales_mpp]
    per_slide = []
    for e in entries:
        if task == "survival" or (num_outputs > 2 and e.label > 0) or e.label == 1:
            shown = 0 if task == "survival" else (int(e.label) if num_outputs > 2 else None)
            auc = entry_localisation(e, patch_attention(network, e, num_clusters, device, shown)[0], masks)
            if auc is not None and None not in auc:
                per_slide.append(auc)
    if not per_slide or len(scales) != len(per_slide[0]):
        return {}
    return {name: float(sum(a[i] for a in per_slide) / len(per_slide)) for i, name in enumerate(scales)}


def run_protocol(
    config: Mapping[str, Any], entries: Sequence[FeatureEntry], variants: Sequence[Variant],
    output_dir: str | Path, num_splits: int = 10, val_fraction: float = 0.25, seed: int = 0,
    test_entries: Sequence[FeatureEntry] = (), is_test: Sequence[bool] | None = None, test_bags: int = 100,
    device: Any = "cpu", progress: bool = True, verbose: bool = False, workers: int = 1, task: str = "classification",
) -> dict:
    """Run every variant on every split (each trained with the raw training ``config``, see :func:`run_one`).
    Returns ``{"mode", "splits", "slides", "runs": {variant: [per split]}}``.

    ``workers > 1`` trains that many runs at once in spawned processes sharing the CPU threads (the MIL
    networks are small, so parallel runs use cores better than threads inside one run); results do not
    depend on it beyond floating-point summation order.

    The test set is ``test_entries`` (a test manifest) plus the ``entries`` flagged in ``is_test`` (manifest rows
    with ``split == test``); without one, the splits are a cross-validation (see
    :func:`scripts.workflows.splits.protocol_splits`).
    """
    all_entries = list(entries) + [e for e in test_entries if e.slide_id not in {x.slide_id for x in entries}]
    flags = list(is_test) if is_test is not None else [False] * len(entries)
    flags += [True] * (len(all_entries) - len(entries))
    by_id = {e.slide_id: e for e in all_entries}
    if len(by_id) != len(all_entries):
        raise ValueError("duplicate slide ids across the cohort and the test set")
    if any(e.label is None or e.label < 0 for e in all_entries):
        raise ValueError("the protocol needs labelled entries with their manifest records (labels never come from the cache)")
    ids = list(by_id)
    splits = protocol_splits(ids, [by_id[i].patient_id for i in ids], [by_id[i].label for i in ids], num_splits,
                             val_fraction, seed, flags, allow_one_class=task == "survival")  # survival: label = event
    mode = "external_test" if any(flags) else "cross_validation"
    logger.info("evaluation: %d variants x %d splits (%s), %d slides", len(variants), len(splits), mode, len(ids))
    out_dir = Path(output_dir) / "runs"
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    jobs = []
    for i, s in enumerate(splits):
        for v in variants:
            parts = {name: [by_id[x] for x in s[name]] for name in ("train", "val", "test")}
            key = stable_hash([v.model, dict(v.overrides), {n: [_entry_key(e) for e in p] for n, p in parts.items()},
                               run_config_key(config), test_bags, seed], 10)
            jobs.append((config, v, parts, out_dir / v.name / f"split_{i}-{key}", test_bags, seed, device))
    results: dict[Path, dict] = {}
    with _quiet(not verbose):
        if workers > 1:
            import multiprocessing
            import os
            from concurrent.futures import ProcessPoolExecutor, as_completed

            threads = max(1, (os.cpu_count() or 1) // workers)
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(threads, verbose, bool(config.get("flush_denormal", True)))) as pool:
                futures = {pool.submit(run_one, *job): job[3] for job in jobs}
                for f in tqdm(as_completed(futures), total=len(jobs), desc="evaluate (variant x split)", disable=not progress):
                    results[futures[f]] = f.result()
        else:
            for job in tqdm(jobs, desc="evaluate (variant x split)", disable=not progress):
                results[job[3]] = run_one(*job)
    runs: dict[str, list[dict]] = {v.name: [results[j[3]] for j in jobs if j[1] is v] for v in variants}
    return {
        "mode": mode,
        "splits": splits,
        "task": task,
        "slides": {i: {"patient_id": by_id[i].patient_id, "label": by_id[i].label,
                       **({"time": by_id[i].record.time, "event": by_id[i].record.event} if task == "survival" else {})} for i in ids},
        "runs": runs,
    }
