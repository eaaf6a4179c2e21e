"""Resume a killed training run where it stopped, with the same result as an uninterrupted run.

After every epoch (after validation) :class:`TrainingResume` writes one checkpoint atomically holding the
state of everything that decides the following epochs: network, optimizer, trainer counters, the torch
and bag-sampling random streams, the best-checkpoint tracking of MONAI's ``CheckpointSaver`` and the
validation history. A rerun with the same training fingerprint (data split, network, hyper-parameters)
loads it (``weights_only=True``) and continues with the next epoch; a finished run removes it.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.cache import atomic_write_bytes

logger = logging.getLogger("csmil.training")


class RNGState:
    """The torch global random stream (dropout, DataLoader shuffling) and a numpy ``Generator`` (bags)."""

    def __init__(self, generator: np.random.Generator | None = None) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        out: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.generator is not None:
            out["numpy"] = self.generator.bit_generator.state
        return out

    def load_state_dict(self, state: Mapping) -> None:
        torch.set_rng_state(state["torch"])
        if self.generator is not None and "numpy" in state:
            self.generator.bit_generator.state = state["numpy"]


class KeyMetricState:
    """Best-checkpoint tracking of a MONAI ``CheckpointSaver`` (which exposes loading but not saving it)."""

    def __init__(self, saver: Any) -> None:
        self.saver = saver

    def state_dict(self) -> dict:
        ckpt = getattr(self.saver, "_key_metric_checkpoint", None)
        return ckpt.state_dict() if ckpt is not None else {}

    def load_state_dict(self, state: Mapping) -> None:
        if state:
            self.saver.load_state_dict(dict(state))


class TrainingResume:
    """ignite handler: per-epoch resume checkpoint in ``directory`` for objects with ``state_dict``.

    Args:
        directory: where ``resume.pt`` lives (one per output folder).
        objects: name -> object with ``state_dict`` / ``load_state_dict`` (the trainer it is attached to is
            added as ``trainer``); a None value (e.g. no learning-rate schedule) is left out.
        fingerprint: identifies the training set-up; a checkpoint with another fingerprint is ignored.
    """

    def __init__(self, directory: str | Path, objects: Mapping[str, Any], fingerprint: str) -> None:
        self.file = Path(directory) / "resume.pt"
        self.objects = {k: v for k, v in objects.items() if v is not None}  # None: not used in this run (a schedule)
        self.fingerprint = fingerprint
        self.enabled = True

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            logger.warning("resume checkpoints are off under torchrun (ranks must resume together)")
            self.enabled = False
            return
        self.objects["trainer"] = engine
        self._load()
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _load(self) -> None:
        if not self.file.is_file():
            return
        state = torch.load(self.file, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            logger.warning("ignoring %s: it belongs to another training set-up", self.file)
            return
        for name, obj in self.objects.items():
            obj.load_state_dict(state["objects"][name])
        logger.info("resuming training after epoch %d from %s", state["epoch"], self.file)

    def _save(self, engine: Engine) -> None:
        buf = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, "epoch": int(engine.state.epoch),
                    "objects": {n: o.state_dict() for n, o in self.objects.items()}}, buf)
        atomic_write_bytes(self.file, buf.getvalue())

    def _finish(self, _engine: Engine) -> None:
        shutil.rmtree(self.file.parent, ignore_errors=True) if self.file.parent.name == "resume" else self.file.unlink(missing_ok=True)
