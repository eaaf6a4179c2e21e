"""Every tunable id of the pipeline config with its type and range, checked once when a command starts.

:data:`RULES` is the table (rendered in docs/configuration.md); :func:`validate` checks the values of the ids a
config holds (every config's ``initialize``: :func:`scripts.workflows.command.start`) before any work and raises one
:class:`~scripts.errors.BundleInputError` naming the id, the value, what is allowed and the fix. The checks
that need the environment (backend importable, device present, folders writable) run here too.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from scripts.config_values import as_bool
from scripts.errors import BundleInputError

BACKENDS = {"openslide": "openslide", "cucim": "cucim", "tifffile": "tifffile"}
POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class Rule:
    """``kind``: int | float | bool | choice | mpp | mpp_list | path | fraction; ``low``/``high`` bound numbers
    (``open_low`` / ``open_high`` make a bound exclusive); ``null`` allows None; ``doc`` says what the id is."""

    kind: str
    doc: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    null: bool = False
    choices: tuple = ()


def _int(doc: str, low: int | None = 1, high: int | None = None) -> Rule:
    return Rule("int", doc, low, high)


def _pos(doc: str, null: bool = False) -> Rule:
    return Rule("float", doc, 0.0, None, open_low=True, null=null)


RULES: dict[str, Rule] = {
    # cohort and folders
    "dataset_dir": Rule("path", "folder of the cohort (manifest.csv; the demo is generated there when missing)"),
    "output_dir": Rule("path", "outputs: caches, logs, reports (created; must be writable)"),
    "cache_dir": Rule("path", "tiles and feature store (created; must be writable)"),
    "ckpt_dir": Rule("path", "folder of models/model.pt"),
    "mpp": Rule("mpp", "level-0 µm per px for slides without resolution metadata", null=True),
    "mpp_force": Rule("bool", "read slides at the mpp override even where their metadata says otherwise"),
    "demo_if_missing": Rule("bool", "generate the demo cohort when the manifest is missing"),
    "demo_num_patients": _int("patients of the demo cohort", 2),
    "demo_slide_size": _int("demo slide edge in px", 512),
    # run
    "seed": _int("random seed", 0),
    "num_workers": _int("DataLoader worker processes", 0),
    "progress": Rule("bool", "progress bars"),
    "flush_denormal": Rule("bool", "flush denormal floats to zero in CPU arithmetic (speed; no effect on GPUs)"),
    "on_error": Rule("choice", "what a bad slide does", choices=POLICIES),
    "device": Rule("device", "torch device (cpu, cuda, cuda:N)"),
    # prepare
    "scales_mpp": Rule("mpp_list", "µm per px of the co-centred scales, finest first"),
    "patch_size": _int("patch edge in px at every scale", 32, 4096),
    "wsi_backend": Rule("choice", "whole-slide image reader", choices=tuple(BACKENDS)),
    "read_cell_um": Rule("float", "grouped reading cell in µm (0 = patch by patch)", 0.0),
    "grid_step_um": _pos("grid spacing in µm (null = the finest patch extent)", null=True),
    "min_tissue": Rule("fraction", "tissue fraction required inside the finest patch", 0.0, 1.0),
    "max_patches": _int("patches kept per slide (0 = all)", 0),
    "tissue_thumbnail_mpp": _pos("resolution of the tissue thumbnail (µm per px)"),
    "tissue_min_saturation": Rule("fraction", "minimum saturation of tissue pixels", 0.0, 1.0),
    "tissue_min_area_um2": Rule("float", "smallest tissue component kept (µm²)", 0.0),
    # pretrain / extract
    "pretrain_scales_mpp": Rule("mpp_list", "scales SimSiam is pretrained on (a subset of scales_mpp)"),
    "pretrain_epochs": _int("SimSiam epochs"),
    "pretrain_batch_size": _int("SimSiam batch size", 2),
    "pretrain_base_lr": _pos("SimSiam base learning rate"),
    "pretrain_max_patches_per_slide": _int("patches per slide for SimSiam (0 = all)", 0),
    "feature_batch_size": _int("patches per encoder batch"),
    "stain_normalization": Rule("choice", "stain normalisation before the encoders, on the device (null = none)", null=True,
                                choices=("macenko", "reinhard")),
    "stain_target": Rule("path", "picture (or slide) whose stain the normalisation matches (null = the method's reference)", null=True),
    "pretrain_stain_jitter": Rule("fraction", "probability of the H&E stain jitter per SimSiam view", 0.0, 1.0),
    "stain_views": _int("stain-augmented feature views per slide for MIL training (0 = off)", 0, 64),
    "stain_views_sigma": Rule("fraction", "stain views: H, E, DAB concentrations scaled by 1 ± sigma", 0.0, 1.0),
    "stain_views_bias": Rule("float", "stain views: H, E, DAB concentrations shifted by ± bias", 0.0, 1.0),
    # cluster / MIL
    "num_clusters": _int("phenotype clusters per slide (K)"),
    "cluster_scale_mpp": _pos("scale whose features are clustered (one of scales_mpp)"),
    "bag_per_cluster": _int("bag slots per cluster"),
    "bag_replacement": Rule("bool", "draw bag slots with replacement"),
    "mil_model": Rule("model", "the MIL model trained (scripts/mil/registry.py MODELS)"),
    "mil_dropout": Rule("fraction", "dropout inside the MIL model (null = the model's default; survival with csmil_joint: 0.25)", 0.0, 1.0, null=True,
                        open_high=True),  # dropout 1 zeroes every input
    "task": Rule("choice", "what the model predicts: the classes of label_map, or time to event", choices=("classification", "survival")),
    "ordinal": Rule("bool", "the classes are ordered grades (adds quadratic weighted kappa)"),
    "survival_bins": _int("discrete time bins of a survival model", 2, 50),
    "balance_classes": Rule("bool", "every class draws as many training bags per epoch as the largest"),
    # training
    "val_fraction": Rule("fraction", "validation share of the patients", 0.0, 1.0, open_low=True),
    "bags_per_slide": _int("training bags per slide per epoch"),
    "val_num_bags": _int("fixed validation bags per slide"),
    "max_epochs": _int("training epochs"),
    "val_interval": _int("epochs between validations"),
    "log_every_iterations": _int("iterations between training-loss points in TensorBoard"),
    "selection_metric": Rule("choice", "validation metric whose best epoch is models/model.pt", choices=("val_loss", "val_auc", "val_acc", "val_cindex")),
    "batch_size": _int("bags per training batch"),
    "learning_rate": _pos("Adam learning rate (train_recipe: published: of the models without a recipe of their own)"),
    "weight_decay": Rule("float", "Adam weight decay (likewise)", 0.0),
    "train_recipe": Rule("choice", "optimiser: shared (every model: Adam at learning_rate) or published (heads from the field: their authors')",
                         choices=("shared", "published")),
    # inference
    "num_bags": _int("random bags averaged per slide"),
    "threshold": Rule("fraction", "probability threshold of the predicted label", 0.0, 1.0),
    "map_class": Rule("int", "class index whose per-class weights the maps show (null: see configs/inference.yaml)", 0, None, null=True),
    "lesion_mask_mpp": _pos("resolution of the lesion masks"),
    "heatmap_mpp": _pos("resolution of the TIFF heatmaps"),
    "overlay_mpp": _pos("resolution of the PNG overlays"),
    # evaluate
    "eval_models": Rule("model_list", "models of the protocol (a bare name is a one-element list)"),
    "ablation_models": Rule("model_list", "models that get the ablation variants"),
    "eval_num_splits": _int("patient-level splits of the protocol", 2),
    "eval_val_fraction": Rule("fraction", "validation share of each split's training patients", 0.0, 1.0, open_low=True),
    "eval_test_bags": _int("random bags per test slide"),
    "eval_bootstrap_resamples": _int("bootstrap resamples", 10),
    "eval_bootstrap_by_patient": Rule("bool", "resample patients, not slides"),
    "eval_verbose": Rule("bool", "per-epoch logs of every run"),
    "eval_transformers": Rule("bool", "add eval_transformer_models (TransMIL, MONAI att_trans and pyramid) to the protocol"),
    "eval_transformer_models": Rule("model_list", "the transformer heads --eval_transformers adds"),
    "eval_workers": _int("runs trained at once"),
    "eval_seed": _int("protocol seed (splits, initialisation, bags); cohort and features keep seed", 0),
}


def _fail(key: str, value: Any, allowed: str, fix: str | None = None) -> BundleInputError:
    return BundleInputError(f"--{key}", f"{value!r} is not allowed ({RULES[key].doc if key in RULES else key}: {allowed})",
                            fix or f"pass --{key} with {allowed}")


def _number(key: str, value: Any, rule: Rule, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and isinstance(value, float) and not value.is_integer()):
        kind = "an integer" if integer else "a number"
        raise _fail(key, value, kind + _range_text(rule))
    v = float(value)
    if not math.isfinite(v):
        raise _fail(key, value, "a finite number" + _range_text(rule))
    low_bad = rule.low is not None and (v <= rule.low if rule.open_low else v < rule.low)
    high_bad = rule.high is not None and (v >= rule.high if rule.open_high else v > rule.high)
    if low_bad or high_bad:
        raise _fail(key, value, ("an integer" if integer else "a number") + _range_text(rule))
    return v


def _range_text(rule: Rule) -> str:
    if rule.low is not None and rule.high is not None:
        return f" in {'(' if rule.open_low else '['}{rule.low:g}, {rule.high:g}{')' if rule.open_high else ']'}"
    if rule.low is not None:
        return f" {'>' if rule.open_low else '>='} {rule.low:g}"
    if rule.high is not None:
        return f" {'<' if rule.open_high else '<='} {rule.high:g}"
    return ""


def _mpp_list(key: str, value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(key, value, 'a non-empty list of µm per px, e.g. "[0.5,1.0,2.0]"')
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.05 <= float(v) <= 50:
            raise _fail(key, value, "µm per px values in [0.05, 50]")
    out = [float(v) for v in value]
    if any(b <= a for a, b in zip(out, out[1:])):
        raise _fail(key, value, "strictly ascending values (finest scale first)")
    return out


def _writable_dir(key: str, value: Any) -> None:
    path = Path(str(value))
    if path.exists() and not path.is_dir():
        raise BundleInputError(path, f"--{key} is an existing file, not a folder", f"pass --{key} with a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise BundleInputError(path, f"--{key} cannot be written ({type(err).__name__}: {err.strerror or err})",
                               f"pass --{key} with a folder you can write to") from None


def _model(key: str, name: Any) -> None:
    import difflib

    from scripts.mil.registry import MODELS

    if name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=1, cutoff=0.6)
        raise BundleInputError(f"--{key}", f"{name!r} is not a model of the bundle" + (f" (did you mean '{close[0]}'?)" if close else ""),
                               f"pass one of {', '.join(sorted(MODELS))}")


def _device(value: Any) -> None:
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise _fail("device", value, "cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise BundleInputError("--device", f"{value!r}: no CUDA device is available here",
                                   "drop --device (the CPU is used) or run on a GPU host")
        if dev.index is not None and dev.index >= n:
            raise BundleInputError("--device", f"{value!r}: this host has {n} CUDA device(s) (cuda:0..cuda:{n - 1})",
                                   f"pass --device cuda:0 .. cuda:{n - 1}")
    elif dev.type not in ("cpu", "mps"):
        raise _fail("device", value, "cpu, cuda or cuda:N")


def _backend_importable(value: str) -> None:
    try:
        importlib.import_module(BACKENDS[value])
    except ImportError as err:
        fixes = {"cucim": "install cuCIM on a GPU host (pip install cucim-cu12) or use --wsi_backend openslide",
                 "openslide": "pip install openslide-python openslide-bin, or use --wsi_backend tifffile"}
        raise BundleInputError("--wsi_backend", f"{value!r} is selected but cannot be imported ({err})",
                               fixes.get(value, "install it or choose another --wsi_backend")) from None


def check_value(key: str, value: Any) -> None:
    """Check one id against its rule (``BundleInputError`` when it breaks it)."""
    rule = RULES[key]
    if value is None:
        if rule.null:
            return
        if rule.kind not in ("bool",):
            raise _fail(key, value, "a value (null is not allowed here)")
    if rule.kind == "int":
        _number(key, value, rule, integer=True)
    elif rule.kind in ("float", "fraction"):
        _number(key, value, rule, integer=False)
    elif rule.kind == "mpp":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.05 <= float(value) <= 20:
            raise _fail(key, value, "µm per px of level 0 as a number in [0.05, 20], e.g. 0.25 (40x) or 0.5 (20x)")
    elif rule.kind == "bool":  # strings as a command line passes them: true/false, yes/no, 1/0 (config_values.as_bool)
        try:
            as_bool(value)
        except ValueError:
            raise _fail(key, value, "True or False") from None
    elif rule.kind == "choice":
        if value not in rule.choices:
            raise _fail(key, value, f"one of {list(rule.choices)}")
    elif rule.kind == "mpp_list":
        _mpp_list(key, value)
    elif rule.kind == "device":
        _device(value)
    elif rule.kind in ("model", "model_list"):
        for name in ([value] if rule.kind == "model" or isinstance(value, str) else list(value or [])):
            _model(key, name)
    elif rule.kind == "path":
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise _fail(key, value, "a folder path")


def validate(values: Mapping[str, Any], writable: Sequence[str] = ("output_dir", "cache_dir")) -> bool:
    """Check every id of ``values`` (those of :data:`RULES`), the relations between them, the backend, the
    device and that the ``writable`` folders can be created and written. Returns True (for ``_requires_``)."""
    for key, value in values.items():
        if key in RULES:
            check_value(key, value)
    scales = values.get("scales_mpp")
    if scales is not None and "cluster_scale_mpp" in values and float(values["cluster_scale_mpp"]) not in [float(s) for s in scales]:
        raise BundleInputError("--cluster_scale_mpp", f"{values['cluster_scale_mpp']!r} is not one of scales_mpp {list(scales)}",
                               "pass --cluster_scale_mpp with one of the scales (the paper clusters on 5x: 2.0)")
    pre = values.get("pretrain_scales_mpp")
    if scales is not None and pre is not None and not set(map(float, pre)) <= set(map(float, scales)):
        raise BundleInputError("--pretrain_scales_mpp", f"{list(pre)} is not a subset of scales_mpp {list(scales)}",
                               "pass --pretrain_scales_mpp with scales of scales_mpp")
    if "wsi_backend" in values:
        _backend_importable(values["wsi_backend"])
    for key in writable:
        if key in values:
            _writable_dir(key, values[key])
    return True


def rules_table() -> str:
    """Markdown table of :data:`RULES` (docs/configuration.md)."""
    rows = ["| id | allowed | what it is |", "|---|---|---|"]
    for key, r in RULES.items():
        if r.kind in ("int", "float", "fraction"):
            allowed = ("integer" if r.kind == "int" else "number") + _range_text(r)
        elif r.kind == "choice":
            allowed = " \\| ".join(map(str, r.choices))
        else:
            allowed = {"bool": "True / False (also true/false, yes/no, 1/0)", "mpp": "number in [0.05, 20]", "mpp_list": "ascending list in [0.05, 50]",
                       "path": "folder", "device": "cpu, cuda, cuda:N (present)", "model": "a name of MODELS",
                       "model_list": "a list of names of MODELS (or one name)"}[r.kind]
        rows.append(f"| `{key}` | {allowed}{' or null' if r.null else ''} | {r.doc} |")
    return "\n".join(rows)
