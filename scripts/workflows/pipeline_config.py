"""The pipeline config (``configs/train.yaml``) for Python callers: benchmarks, ``scripts.plan``, tests.

Bundle commands parse it through ``python -m monai.bundle run <stage> --config_file configs/<stage>.yaml``
(every ``configs/<stage>.yaml`` is a link to it); this is the same parse from Python, rooted at this bundle
whatever the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from monai.bundle import ConfigParser

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_CONFIG = BUNDLE_ROOT / "configs" / "train.yaml"


def pipeline_parser(overrides: Mapping[str, Any] | None = None, config_file: str | Path = PIPELINE_CONFIG) -> ConfigParser:
    """A parser of the pipeline config with ``bundle_root`` set to this bundle and ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser
