"""ABMIL: gated attention-based MIL (Ilse, Tomczak and Welling, ICML 2018), the single-scale standard of the field,
with the paper's sizes (instance embedding L = 500, attention D = 128, one attention branch) on precomputed
patch features. Its instance embedding is ``Linear(D_in, 500) - ReLU`` (the paper's MNIST-bags network ends its
feature extractor with that layer), its classifier one linear layer on the attention-pooled embedding (C logits
instead of the paper's one sigmoid output: softmax cross-entropy on two logits is the same model).

Scale views (:func:`scripts.mil.base.combine_scales`): ``abmil_20x`` sees one scale, ``abmil_concat`` the scales
concatenated per location. Maps: the attention weights; scale weights one-hot / uniform
(:func:`scripts.mil.base.view_scale_weights`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from scripts.mil import recipe
from scripts.mil.base import MILBase, combine_scales, view_dim, view_scale_weights
from scripts.mil.pooling import GatedScore, attention_pool, cluster_mass


class ABMIL(MILBase):
    """Gated attention MIL (Ilse et al., 2018) on one scale view (see the module docstring)."""

    def __init__(self, in_features: int = 2048, num_scales: int = 3, num_clusters: int = 8, scale_mode: str = "select",
                 scale: int = 0, hidden: int = 500, attn_hidden: int = 128, dropout: float = 0.0, num_classes: int = 2) -> None:
        super().__init__(in_features, num_scales, num_clusters)
        self.scale_mode, self.scale = scale_mode, scale
        self.embed = nn.Sequential(nn.Linear(view_dim(in_features, num_scales, scale_mode), hidden), nn.ReLU())
        self.attention = GatedScore(hidden, attn_hidden, dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    @torch.jit.ignore
    def published_recipe(self) -> Optional[recipe.TrainingRecipe]:
        """Ilse et al.'s optimiser (:data:`scripts.mil.recipe.ABMIL`)."""
        return recipe.ABMIL

    @torch.jit.export
    def forward_attention(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits [B, C] and the maps' weights: ``patch`` / ``instance`` [B, N] (the attention), ``cluster`` [B, K],
        ``scale`` [B, N, S] (the view's weights)."""
        x, mask = self.prepare(x, mask)
        inst, imask = combine_scales(x, mask, self.scale_mode, self.scale, self.num_clusters)
        h = self.embed(inst)
        w, z = attention_pool(h, self.attention(h), imask)
        return self.classifier(z), {"scale": view_scale_weights(self.scale_mode, self.scale, x), "instance": w,
                                    "patch": w, "cluster": cluster_mass(w, self.num_clusters)}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, num_classes] of bags ``x`` [B, S, N, D] with optional ``mask`` [B, N]."""
        return self.forward_attention(x, mask)[0]
