"""The CS-MIL MONAI Deploy application: slide(s) in, prediction JSON/CSV and per-scale attention maps out.

    python deploy -i <slide | folder | manifest.csv> -o <output folder> -m models/deploy [-w <work folder>]

(the MONAI Deploy App SDK's standard arguments; in a MAP they come from HOLOSCAN_INPUT_PATH,
HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH and HOLOSCAN_WORKDIR). Options without an SDK argument are read from
the environment: ``CSMIL_MPP`` (level-0 µm per px for slides whose metadata lacks it), ``CSMIL_DEVICE``
(default ``cuda`` when available, else ``cpu``), ``CSMIL_NUM_WORKERS`` (patch-reading processes, default 0).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from holoscan.conditions import CountCondition
from monai.deploy.core import Application

from scripts.deploy.operators import (
    AttentionMapWriterOperator,
    CSMILInferenceOperator,
    MultiScaleEncoderOperator,
    SlideLoaderOperator,
)
from scripts.deploy.runtime import DeployModels

logger = logging.getLogger(__name__)


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def preflight(argv: list[str] | None = None) -> None:
    """The app's input checks before its graph starts (model repository, slides), so bad input ends with the
    bundle's one error line and not also in the Holoscan executor's log."""
    import sys

    from scripts.deploy.operators import load_records

    ctx = Application.init_app_context(argv if argv is not None else sys.argv)
    models = DeployModels(Path(ctx.model_path))
    load_records(ctx.input_path, models.tiling.backend, _env_float("CSMIL_MPP"))


class CSMILDeployApp(Application):
    """slide loader -> multi-scale tiler and encoders -> CS-MIL (TorchScript) -> writer."""

    name = "csmil-deploy"
    description = "CS-MIL whole-slide classification with per-scale attention maps"

    def compose(self) -> None:
        ctx = Application.init_app_context(self.argv)
        models = DeployModels(Path(ctx.model_path))
        out = Path(ctx.output_path)
        out.mkdir(parents=True, exist_ok=True)
        work = Path(ctx.workdir) if ctx.workdir else out / "cache"
        device = os.environ.get("CSMIL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        workers = int(os.environ.get("CSMIL_NUM_WORKERS") or 0)
        logger.info("CS-MIL Deploy app: input %s, output %s, models %s (bundle %s), device %s",
                    ctx.input_path, out, models.root, models.settings.get("bundle_version"), device)
        loader = SlideLoaderOperator(self, CountCondition(self, 1), input_path=ctx.input_path, backend=models.tiling.backend,
                                     mpp=_env_float("CSMIL_MPP"), name="slide_loader")
        encoder = MultiScaleEncoderOperator(self, models=models, work_dir=work, device=device, num_workers=workers,
                                            name="multiscale_tiler_encoders")
        csmil = CSMILInferenceOperator(self, models=models, device=device, name="csmil_inference")
        writer = AttentionMapWriterOperator(self, models=models, output_dir=out, name="writer")
        self.add_flow(loader, encoder, {("slides", "slides")})
        self.add_flow(encoder, csmil, {("entries", "entries")})
        self.add_flow(csmil, writer, {("predictions", "predictions")})
