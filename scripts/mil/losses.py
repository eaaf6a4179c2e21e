"""The training loss: slide cross-entropy, plus a model's own auxiliary loss where it has one (CLAM-SB's
instance-level clustering loss, :meth:`scripts.mil.clam.CLAMSB.combine_loss`)."""

from __future__ import annotations

import torch
from torch import nn


class MILLoss(nn.Module):
    """``CrossEntropyLoss`` on the slide logits; in a training step (``network`` in training mode, gradients on) of a
    model with ``combine_loss(loss, label)``, that combines the slide loss with its auxiliary loss. Everywhere else
    (the validation loss and model selection: ignite's metrics run under ``no_grad``, after MONAI's evaluator has put
    the network back in training mode) it is the plain cross-entropy, so every model is selected on the same
    criterion.

    ``network`` is the model itself (``@network_def``), not a DistributedDataParallel wrapper around it. With
    ``survival_cuts`` (``task: survival``) the slide loss is the discrete-time likelihood of (time, event) targets
    (:class:`scripts.tasks.survival.DiscreteTimeNLL`) and no auxiliary loss is added (CLAM's instance loss needs
    classes).
    """

    def __init__(self, network: nn.Module | None = None, survival_cuts: list[float] | None = None) -> None:
        super().__init__()
        if survival_cuts is None:
            self.ce = nn.CrossEntropyLoss()
        else:
            from scripts.tasks.survival import DiscreteTimeNLL

            self.ce = DiscreteTimeNLL(survival_cuts)
        self.survival = survival_cuts is not None
        self._network = [network]  # a list: not a submodule (the loss holds no parameters of its own)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(pred, target)
        if self.survival:
            return loss
        net = self._network[0]
        if net is not None and net.training and torch.is_grad_enabled() and hasattr(net, "combine_loss"):
            return net.combine_loss(loss, target)
        return loss
