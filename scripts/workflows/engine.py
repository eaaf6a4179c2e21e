"""Glue between bags and MONAI/ignite engines: batch preparation and the multi-bag inferer."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

from scripts.errors import BundleInputError


class PrepareBagBatch:
    """``prepare_batch`` for MONAI engines: returns ``(image, label, (), {"mask": mask})``."""

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any):
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        label = batchdata["label"]  # class indices, or float (time, event) rows for survival
        label = (label.float() if label.is_floating_point() else label.long()).to(device=device, non_blocking=non_blocking)
        mask = batchdata["mask"].to(device=device, non_blocking=non_blocking)
        return image, label, (), {"mask": mask}


class BagEnsembleInferer(Inferer):
    """Slide prediction from R bags: input [B, R, S, N, D] + mask [B, R, N] -> log of the mean class
    probability over bags, [B, C]. Cross-entropy on these log-probabilities equals the NLL of the
    averaged prediction (the paper's test-time protocol)."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, mask: torch.Tensor | None = None, **kwargs: Any):
        b, r = inputs.shape[:2]
        flat_mask = None if mask is None else mask.reshape(b * r, -1)
        logits = network(inputs.reshape(b * r, *inputs.shape[2:]), mask=flat_mask)
        probs = torch.softmax(logits.float(), dim=-1).reshape(b, r, -1).mean(dim=1)
        return probs.clamp_min(1e-7).log()


def positive_probability(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """ignite ``output_transform``: (P(class 1), label) from an engine output with log-prob ``pred``; with more than
    two classes all class probabilities [B, C] (for the macro one-vs-rest AUC)."""
    pred, label = output["pred"], output["label"]
    probs = torch.softmax(pred.float(), dim=-1)
    return (probs[:, 1] if probs.shape[-1] == 2 else probs), label


def pred_and_label(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """ignite ``output_transform``: (pred, label)."""
    return output["pred"], output["label"]


def _auc_or_nan(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    y_true, p = y.cpu().numpy(), y_pred.cpu().numpy()
    if p.ndim == 2:  # K > 2 classes: macro one-vs-rest over the classes present (undefined with fewer than 2)
        present = sorted(set(y_true.tolist()))
        if len(present) < 2:
            return float("nan")
        if len(present) == p.shape[1]:
            return float(roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=list(range(p.shape[1]))))
        return float(sum(roc_auc_score(y_true == c, p[:, c]) for c in present) / len(present))
    if len(set(y_true.tolist())) < 2:
        return float("nan")  # undefined with one class (tiny validation sets)
    return float(roc_auc_score(y_true, p))


def roc_auc_metric(output_transform=positive_probability):
    """Slide-level ROC AUC as an ignite ``EpochMetric`` (sklearn), NaN when only one class is present."""
    from ignite.metrics import EpochMetric

    return EpochMetric(_auc_or_nan, output_transform=output_transform, check_compute_fn=False)


#: validation metrics where a lower value is better (the others: higher is better)
LOWER_IS_BETTER = frozenset({"val_loss"})


def selection_metrics(metrics: dict, selection_metric: str, task: str = "classification") -> tuple[dict, dict]:
    """``(key_val_metric, additional_metrics)`` of the evaluator: ``selection_metric`` (the metric whose best epoch
    becomes models/model.pt) and the task's other validation metrics; a metric the task does not compute stops with
    one line listing those it does."""
    if selection_metric not in metrics:
        raise BundleInputError("--selection_metric", f"{selection_metric!r} is not a validation metric of task '{task}'",
                               f"pass one of {sorted(metrics)}")
    return {selection_metric: metrics[selection_metric]}, {k: v for k, v in metrics.items() if k != selection_metric}


def better(selection_metric: str):
    """The evaluator's ``metric_cmp_fn`` for ``selection_metric`` (lower loss, higher AUC / accuracy / c-index)."""
    if selection_metric in LOWER_IS_BETTER:
        return lambda current, prev: current < prev
    return lambda current, prev: current > prev
