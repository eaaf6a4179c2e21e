"""The base every MIL model of the bundle shares (torchmil's shape): what a model does with its input before its
own layers.

Bags are ``x`` [B, S, N, D]: S scales, N instance slots laid out cluster-major (``N = num_clusters *
per_cluster``), D-dim patch features; ``mask`` [B, N] marks real slots (None: all real). :class:`MILBase` holds

* the per-feature input standardisation, fitted on the training bags (:meth:`MILBase.set_input_stats`) and kept in
  the buffers ``input_mean`` / ``input_std``, so checkpoints and TorchScript exports carry it;
* the shape check and the default mask (:meth:`MILBase.prepare`), one definition instead of one per model.

A model implements ``forward`` (logits [B, C]) and, for the maps, ``forward_attention`` (logits and its weights).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


class MILBase(nn.Module):
    """Input standardisation, shape check and default mask of a MIL model (see the module docstring)."""

    def __init__(self, in_features: int, num_scales: int, num_clusters: int) -> None:
        super().__init__()
        self.in_features, self.num_scales, self.num_clusters = in_features, num_scales, num_clusters
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))

    @torch.jit.ignore
    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> "MILBase":
        """Standardise inputs as ``(x - mean) / std`` per feature (fit on training data); returns self."""
        if torch.as_tensor(mean).numel() != self.in_features:
            raise ValueError(
                f"features have {torch.as_tensor(mean).numel()} dimensions but the network expects in_features="
                f"{self.in_features}: set encoder_arch to the encoder that produced the feature store"
            )
        self.input_mean.copy_(torch.as_tensor(mean, dtype=self.input_mean.dtype))
        self.input_std.copy_(torch.as_tensor(std, dtype=self.input_std.dtype).clamp_min(1e-6))
        return self

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - input_mean) / input_std`` over the feature axis."""
        return (x - self.input_mean) / self.input_std

    def prepare(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Check ``x`` is [B, num_scales, N, in_features]; return it standardised and the boolean mask [B, N]
        (all slots real when ``mask`` is None)."""
        if x.dim() != 4 or x.shape[1] != self.num_scales or x.shape[3] != self.in_features:
            raise ValueError(f"expected bags [B, {self.num_scales}, N, {self.in_features}], got {list(x.shape)}")
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
        return self.standardise(x), mask.to(torch.bool)
