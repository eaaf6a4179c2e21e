"""DSMIL, the dual-stream aggregator of Li et al. (CVPR 2021), on features concatenated over scales: an instance
classifier picks the critical instance, attention by similarity to it builds the bag embedding, and the two
streams' scores are averaged (the bundle's default ``mil_model``; :mod:`scripts.mil.base` interface).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from scripts.mil.base import MILBase
from scripts.mil.pooling import CriticalInstancePooling, cluster_mass


class DSMIL(MILBase):
    """Dual-stream MIL (Li et al., CVPR 2021) on features concatenated over scales; 2-class logits."""

    def __init__(self, in_features: int = 2048, num_scales: int = 3, num_clusters: int = 8, hidden: int = 64,
                 dropout: float = 0.0, num_classes: int = 2) -> None:
        super().__init__(in_features, num_scales, num_clusters)  # input standardisation (MILBase)
        self.embed = nn.Sequential(nn.Linear(in_features * num_scales, hidden), nn.ReLU())
        self.pool = CriticalInstancePooling(hidden, num_classes, dropout)


    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, mask = self.prepare(x, mask)
        b, s, n, d = x.shape
        h = self.embed(x.permute(0, 2, 1, 3).reshape(b, n, s * d))  # [B, N, H]
        return self.pool(h, mask)[0]

    @torch.jit.export
    def forward_attention(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits and the maps' weights, as :meth:`scripts.mil.fusion.JointScaleMIL.forward_attention`.

        ``patch`` / ``instance`` [B, N]: softmax over the bag of the instance classifier's class-1 margin (where
        the critical-instance stream looks); ``scale`` [B, N, S]: the concatenation has no scale attention, so
        each location's scale weights are a softmax over scales of each scale's additive share of that margin
        (the embedding is ``ReLU(sum_s W_s x_s + b)``: within the active units the margin splits exactly into
        per-scale terms); ``cluster`` [B, K]: patch weight per phenotype cluster; ``bag`` [B, N]: bag-stream
        attention. ``patch_class`` [B, N, C] / ``scale_class`` [B, N, S, C]: the same for each class's margin (the maps of
        a class other than the predicted one; with two classes column 1 is ``patch`` / ``scale``).
        """
        x, mask = self.prepare(x, mask)
        b, s, n, d = x.shape
        lin = self.embed[0]
        u = torch.einsum("bsnd,hsd->bnsh", x, lin.weight.reshape(lin.weight.shape[0], s, d))  # per-scale terms
        z = u.sum(dim=2) + lin.bias
        logits, weights, bag = self.pool(torch.relu(z), mask)
        w = self.pool.instance_classifier.weight
        active = u * (z > 0).unsqueeze(2).to(u.dtype)
        share = (active * (w[-1] - w[0])).sum(-1)  # [B, N, S]
        c = w.shape[0]
        margin = w - (w.sum(0, keepdim=True) - w) / (c - 1)  # per class: its weights minus the others' mean
        scale_c = torch.softmax(torch.einsum("bnsh,ch->bnsc", active, margin), dim=2)  # [B, N, S, C]
        if c == 2:
            scale = torch.softmax(share, dim=-1)
        else:  # the predicted class's, as the patch weights (the pooling's)
            pred = logits.argmax(dim=-1)
            scale = scale_c.gather(3, pred.reshape(b, 1, 1, 1).expand(b, n, s, 1)).squeeze(3)
        return logits, {"scale": scale, "instance": weights, "patch": weights,
                        "cluster": cluster_mass(weights, self.num_clusters), "bag": bag,
                        "patch_class": self.pool.class_weights(torch.relu(z), mask), "scale_class": scale_c}
