"""The bundle's configs for Python callers: benchmarks, ``scripts.plan``, the upgrade tool, tests.

Bundle commands parse them through ``python -m monai.bundle run [stage] --config_file configs/<x>.yaml``; these are
the same parses from Python, rooted at this bundle whatever the working directory, with the command-line overrides
given as a mapping and the yes/no ids read as booleans (as ``initialize`` does for a command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from monai.bundle import ConfigParser

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE_ROOT / "configs"
PIPELINE_CONFIG = CONFIGS / "train.yaml"
EVALUATE_CONFIG = CONFIGS / "evaluate.yaml"
INFERENCE_CONFIG = CONFIGS / "inference.yaml"
DEPLOY_CONFIG = CONFIGS / "deploy.yaml"


def pipeline_parser(overrides: Mapping[str, Any] | None = None,
                    config_file: str | Path | Sequence[str | Path] = PIPELINE_CONFIG) -> ConfigParser:
    """A parser of ``config_file`` (default: configs/train.yaml; a list is merged in order, as MONAI does) with
    ``bundle_root`` set to this bundle and ``overrides`` applied."""
    from scripts.config_checks import RULES
    from scripts.config_values import as_bool

    parser = ConfigParser()
    files = [str(f) for f in config_file] if isinstance(config_file, (list, tuple)) else str(config_file)
    parser.read_config(files)
    parser["bundle_root"] = str(BUNDLE_ROOT)
    for key, value in (overrides or {}).items():
        parser[key] = as_bool(value, key) if key in RULES and RULES[key].kind == "bool" else value
    return parser


def training_config(overrides: Mapping[str, Any] | None = None) -> dict:
    """The raw training config (configs/train.yaml, rooted at this bundle, ``overrides`` applied): what the
    evaluation protocol trains each run with (:func:`scripts.evaluation.workflow.evaluate`)."""
    return pipeline_parser(overrides).get()
