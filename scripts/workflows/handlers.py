"""ignite handlers specific to this bundle."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from scripts.cache import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from scripts.mil.recipe import TrainingRecipe

logger = logging.getLogger("csmil.training")


class ValidationSummary:
    """Tracks the validation metrics of every epoch and, when training ends, logs and saves the best epoch by
    ``key`` (the selection metric: the lowest validation loss, or the highest of a metric with
    ``lower_is_better=False``, e.g. the survival c-index): ``<output>/training_summary.json``.

    Attach to the trainer with the evaluator given (``train#handlers`` in configs/train.yaml).
    """

    def __init__(self, evaluator: Engine, output_file: str | Path, key: str = "val_loss", extra: dict | None = None,
                 lower_is_better: bool = True) -> None:
        self.evaluator = evaluator
        self.output_file = Path(output_file)
        self.key = key
        self.lower_is_better = bool(lower_is_better)
        self.history: list[dict[str, Any]] = []
        self.extra = extra or {}

    def attach(self, engine: Engine) -> None:
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._record, engine)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state.get("history", [])]

    def _record(self, _evaluator: Engine, trainer: Engine) -> None:
        # undefined metrics (AUC of a one-class validation set) are null, never NaN, in the summary
        metrics = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in self.evaluator.state.metrics.items()
                   if isinstance(v, (int, float))}
        self.history.append({"epoch": int(trainer.state.epoch), **metrics})

    def best(self) -> dict[str, Any] | None:
        valid = [h for h in self.history if h.get(self.key) is not None]
        if not valid:
            return None
        return min(valid, key=lambda h: h[self.key]) if self.lower_is_better else max(valid, key=lambda h: h[self.key])

    def _finish(self, trainer: Engine) -> None:
        best = self.best()
        summary = {"best": best, "selection_metric": self.key, "history": self.history, "epochs": int(trainer.state.epoch), **self.extra}
        atomic_write_json(self.output_file, summary)
        if best is None:
            logger.warning("training finished without validation metrics")
            return
        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        if "val_cindex" in best:  # survival
            logger.info("Validation c-index: %s  (best validation epoch %d by %s: loss %s; summary: %s)", fmt(best["val_cindex"]),
                        best["epoch"], self.key, fmt(best.get("val_loss")), self.output_file)
            return
        auc = best.get("val_auc")
        msg = (
            f"best validation epoch {best['epoch']}{'' if self.key == 'val_loss' else ' by ' + self.key}: loss {fmt(best.get('val_loss'))}, "
            f"AUC {fmt(auc)}, accuracy {fmt(best.get('val_acc'))} (summary: {self.output_file})"
        )
        if auc is None:
            msg += "; AUC is undefined: the validation slides are all of one class"
        logger.info("Validation AUC: %s  (%s)", fmt(auc), msg)


class LossGuard:
    """Stop training with one line when it diverges, instead of finishing with a useless model (ignite's
    ``TerminateOnNan`` stops silently and keeps a checkpoint from before the problem without telling anyone):

    * a non-finite loss (NaN / Inf) at any iteration;
    * an epoch whose mean training loss exceeds ``max_loss_factor`` x the chance-level loss (cross-entropy of a
      uniform guess over ``num_classes``: ln 2 = 0.69 for two classes, so the default stops above 69, where the
      weights have exploded: ``--learning_rate 1e6`` reaches 1e22 in the first epoch).

    The message names the epoch and the learning rate, the usual cause: ``learning_rate`` under the shared recipe,
    or, given the ``recipe`` a head trains with (``train_recipe: published``), that recipe's rate, which
    ``--learning_rate`` does not change. Attach before the validation handler so that a diverged epoch is never
    validated or checkpointed.
    """

    def __init__(self, learning_rate: float | None = None, num_classes: int = 2, max_loss_factor: float = 100.0,
                 output_transform=lambda out: out[0]["loss"] if isinstance(out, list) else out["loss"],
                 recipe: TrainingRecipe | None = None) -> None:
        self.learning_rate = learning_rate
        self.recipe = recipe
        self.chance_loss = math.log(max(int(num_classes), 2))
        self.max_loss = float(max_loss_factor) * self.chance_loss
        self.output_transform = output_transform
        self._sum, self._count = 0.0, 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _reset(self, _engine: Engine) -> None:
        self._sum, self._count = 0.0, 0

    def _fix(self) -> str:
        tail = "; if it persists, check the feature store for NaN/Inf (extract again)"
        if self.recipe is not None and self.recipe.name != "shared":
            return (f"the model trains with its published recipe ({self.recipe.describe()}), which --learning_rate does not "
                    f"change: train with --train_recipe shared and a --learning_rate that converges{tail}")
        lr = "" if self.learning_rate is None else f" (now {self.learning_rate:g})"
        return f"lower --learning_rate{lr}, e.g. by 10x{tail}"

    def __call__(self, engine: Engine) -> None:
        from scripts.errors import BundleInputError

        loss = float(self.output_transform(engine.state.output))
        if not math.isfinite(loss):
            raise BundleInputError(f"training epoch {engine.state.epoch}, iteration {engine.state.iteration}",
                                   f"loss is {loss}: training diverged", self._fix())
        self._sum += loss
        self._count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        from scripts.errors import BundleInputError

        mean = self._sum / max(self._count, 1)
        if mean > self.max_loss:
            raise BundleInputError(
                f"training epoch {engine.state.epoch}",
                f"mean train loss {mean:.3g} is {mean / self.chance_loss:.3g} x the chance level {self.chance_loss:.3f}: training diverged",
                self._fix())


def _one_line_exception(e: BaseException | None) -> bool:
    """An interrupt (SystemExit, KeyboardInterrupt) or bad input: what the command reports in one line."""
    from scripts.errors import BundleInputError, exception_chain

    return e is not None and (not isinstance(e, Exception) or any(isinstance(c, BundleInputError) for c in exception_chain(e)))


class _QuietTermination(logging.Filter):
    """Drops ignite's ``Engine run is terminating due to exception: ...`` record (logged before any handler runs)
    for the exceptions :class:`OneLineErrors` passes to the command's one line: after Ctrl-C it read
    ``... due to exception: 130``. Other errors, and every error with ``--debug``, keep it."""

    def filter(self, record: logging.LogRecord) -> bool:
        import sys

        from scripts.errors import debug

        if "is terminating due to exception" not in record.getMessage():
            return True
        return debug() or not _one_line_exception(sys.exc_info()[1])  # logged inside ignite's except block


class OneLineErrors:
    """First ``EXCEPTION_RAISED`` handler of an engine: bad input, a full disk and an interrupt propagate at
    once, so MONAI's ``StatsHandler`` does not log a traceback around the one line the command prints
    (:mod:`scripts.errors`, :mod:`scripts.interrupts`); with ``--debug`` the traceback is logged as before.

    A full disk met while this engine's handlers write (e.g. MONAI's ``CheckpointSaver`` saving
    ``models/model.pt``) becomes one :class:`scripts.errors.DiskFullError` naming ``folder`` and ``what``.
    Other errors pass to the next handler unchanged. Attach it before every other handler.
    """

    def __init__(self, folder: str | Path | None = None, what: str = "this stage's outputs") -> None:
        self.folder = folder
        self.what = what

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)
        if not any(isinstance(f, _QuietTermination) for f in engine.logger.filters):
            engine.logger.addFilter(_QuietTermination())

    def __call__(self, engine: Engine, e: BaseException) -> None:
        from scripts.errors import debug, disk_full_error, exception_chain, is_disk_full

        others = len(engine._event_handlers.get(Events.EXCEPTION_RAISED, [])) > 1  # noqa: SLF001 - ignite has no public count
        if _one_line_exception(e):
            if debug() and others:
                return  # --debug: StatsHandler logs the traceback (and raises)
            raise e  # an interrupt (SystemExit, KeyboardInterrupt) or bad input: one line, printed by the command
        full = next((c for c in exception_chain(e) if is_disk_full(c)), None)
        if full is not None and not debug():
            raise disk_full_error(full, self.folder, self.what) from e
        if not others:
            raise e  # ignite swallows an exception that no EXCEPTION_RAISED handler raises
        # any other error: the next handler (MONAI's StatsHandler) logs its traceback and raises it


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` writing through :func:`scripts.cache.atomic_write_bytes`: a checkpoint is the old
    complete file or the new complete file, never a torn one (MONAI's ``CheckpointSaver`` saves with
    ``atomic=False``, so a full disk or Ctrl-C while saving ``model.pt`` would leave it cut and the previous best
    lost). Unlike ignite's ``atomic=True`` the file keeps the umask's permissions (MONAI's reason for ``False``)."""

    def __init__(self, dirname: str | Path, filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(str(dirname), require_empty=False, atomic=False, create_dir=True, **kwargs)
        self.filename = filename

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        import io

        import ignite.distributed as idist
        import torch

        if idist.get_rank() != self.save_on_rank:
            return
        buf = io.BytesIO()
        torch.save(checkpoint, buf, **self.kwargs)
        atomic_write_bytes(Path(self.dirname) / (self.filename or filename), buf.getvalue())

    def remove(self, filename: str) -> None:
        """ignite removes the previous best before saving the next; a fixed name (``model.pt``) is kept until the
        next save replaces it, so there is always a complete best checkpoint (MONAI deletes it first)."""
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments, same files) whose writes are atomic (:class:`AtomicDiskSaver`)."""

    def __init__(self, save_dir: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(save_dir, *args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(save_dir, getattr(ckpt.save_handler, "filename", None))


class MLflowArtifacts:
    """Log files and folders as artefacts of the MLflow run that MONAI's ``--tracking mlflow`` opened.

    MONAI's tracking logs parameters and metrics; its only artefact is the executed config, and that one is
    lost when ``output_dir`` is given on the command line (the path expression it builds is not evaluated).
    This handler finds the ``MLFlowHandler`` MONAI attached to the same engine and, when training completes,
    logs ``paths`` (the training summary, the best checkpoint, the executed config, TensorBoard logs) into
    its run. Without tracking it does nothing.
    """

    def __init__(self, paths: list[str], config_dir: str | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.config_dir = config_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def _mlflow_handler(self, engine: Engine):
        from monai.handlers import MLFlowHandler

        for handler, _, _ in engine._event_handlers.get(Events.COMPLETED, []):  # MONAI appends its handler last
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, MLFlowHandler) and owner.cur_run is not None:
                return owner
        return None

    def __call__(self, engine: Engine) -> None:
        mlf = self._mlflow_handler(engine)
        if mlf is None:
            return
        run_id = mlf.cur_run.info.run_id
        paths = list(self.paths)
        if self.config_dir:  # the executed config MONAI saved (config_<time>.json)
            paths += sorted(str(p) for p in Path(self.config_dir).glob("config_*.json"))[-1:]
        logged = 0
        for p in map(Path, paths):
            if p.is_file():
                mlf.client.log_artifact(run_id, str(p))
                logged += 1
            elif p.is_dir():
                mlf.client.log_artifacts(run_id, str(p), artifact_path=p.name)
                logged += 1
        logger.info("MLflow: %d artefacts logged to run %s", logged, run_id)
