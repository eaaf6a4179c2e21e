"""The base every MIL model of the bundle shares (torchmil's shape): what a model does with its input before its
own layers.

Bags are ``x`` [B, S, N, D]: S scales, N instance slots laid out cluster-major (``N = num_clusters *
per_cluster``), D-dim patch features; ``mask`` [B, N] marks real slots (None: all real). :class:`MILBase` holds

* the per-feature input standardisation, fitted on the training bags (:meth:`MILBase.set_input_stats`) and kept in
  the buffers ``input_mean`` / ``input_std``, so checkpoints and TorchScript exports carry it;
* the shape check and the default mask (:meth:`MILBase.prepare`), one definition instead of one per model.

A model implements ``forward`` (logits [B, C]) and, for the maps, ``forward_attention`` (logits and its weights:
``patch`` and ``instance`` [B, N], ``scale`` [B, N, S], ``cluster`` [B, K]). Models that see the scales through one
*view* (:func:`combine_scales`: one scale, the scales concatenated or summed per location, or every scale an instance)
and have no cross-scale attention give the scale weights of :func:`view_scale_weights`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from scripts.mil.recipe import TrainingRecipe


#: how a model without cross-scale attention sees the scales of a location
SCALE_VIEWS = ("select", "instances", "sum", "concat")


def combine_scales(x: torch.Tensor, mask: torch.Tensor, mode: str, scale: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bags [B, S, N, D] -> instances [B, N', D'] (cluster-major) and mask [B, N'] for a scale view: ``select`` one
    scale (D' = D), ``sum`` over scales (D' = D), ``concat`` per location (D' = S * D), ``instances`` (every scale of
    every location its own instance: N' = S * N, each cluster's slots hold its M locations x S scales)."""
    b, s, n, d = x.shape
    if mode == "select":
        return x[:, scale], mask
    if mode == "sum":
        return x.sum(dim=1), mask
    if mode == "concat":
        return x.permute(0, 2, 1, 3).reshape(b, n, s * d), mask
    m = n // k
    inst = x.permute(0, 2, 1, 3).reshape(b, k, m * s, d).reshape(b, n * s, d)
    return inst, mask.reshape(b, k, m, 1).expand(b, k, m, s).reshape(b, n * s)


def view_dim(in_features: int, num_scales: int, mode: str) -> int:
    """Feature size of one instance of a scale view (see :func:`combine_scales`)."""
    if mode not in SCALE_VIEWS:
        raise ValueError(f"scale_mode must be one of {', '.join(SCALE_VIEWS)}, got {mode!r}")
    return in_features * (num_scales if mode == "concat" else 1)


def view_scale_weights(mode: str, scale: int, x: torch.Tensor) -> torch.Tensor:
    """Scale weights [B, N, S] of the maps for a model that sees bags ``x`` [B, S, N, D] through a view without
    cross-scale attention: one-hot on the selected scale (``select``), uniform otherwise (every scale enters alike)."""
    b, s, n = x.shape[0], x.shape[1], x.shape[2]
    if mode == "select":
        w = torch.zeros(b, n, s, dtype=x.dtype, device=x.device)
        w[:, :, scale] = 1.0
        return w
    return torch.full((b, n, s), 1.0 / s, dtype=x.dtype, device=x.device)


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

    @torch.jit.ignore
    def published_recipe(self) -> Optional[TrainingRecipe]:
        """The optimiser the model's authors published (``train_recipe: published``); None: the model has no recipe of
        its own and trains with the shared one (the paper's baselines and CS-MIL: the protocol's recipe is theirs)."""
        return None

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
