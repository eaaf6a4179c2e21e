"""Attention-pooling MIL baselines of the CS-MIL paper's Table 1 (:class:`AttentionMIL`), by how scales are combined
before pooling: ``select`` one scale (DeepAttnMISL at 20x / 10x / 5x), ``instances`` (every scale of every location is
its own instance: Gated Attention / DeepAttnMISL multi-scale), ``sum`` (features of one location added over scales:
MDMIL-style), ``concat`` (concatenated over scales); pooling ``hierarchical`` (instances in clusters, then clusters:
DeepAttnMISL) or ``flat``; attention plain (Linear-Tanh-Linear) or gated (Ilse et al., 2018). Same interface as every
model (:mod:`scripts.mil.base`): ``forward(x [B, S, N, D], mask [B, N] | None) -> logits [B, C]``, bags cluster-major.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from scripts.mil.base import MILBase, combine_scales, view_dim, view_scale_weights
from scripts.mil.pooling import AttentionScore, GatedScore, HierarchicalPool, attention_pool, classifier_head, cluster_mass


class AttentionMIL(HierarchicalPool, MILBase):
    """Attention-pooling MIL over scale-combined instances (see the module docstring)."""

    def __init__(
        self, in_features: int = 2048, num_scales: int = 3, num_clusters: int = 8, scale_mode: str = "select",
        scale: int = 0, pooling: str = "hierarchical", gated: bool = False, hidden: int = 64, attn_hidden: int = 32,
        dropout: float = 0.5, num_classes: int = 2,
    ) -> None:
        super().__init__(in_features, num_scales, num_clusters)  # input standardisation (MILBase)
        if pooling not in ("hierarchical", "flat"):
            raise ValueError(f"pooling must be 'hierarchical' or 'flat', got {pooling!r}")
        self.scale_mode, self.scale, self.hierarchical = scale_mode, scale, pooling == "hierarchical"
        d = view_dim(in_features, num_scales, scale_mode)
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.ReLU())
        # the same score module as CS-MIL's pooling (w^T tanh(V h)), or the gated one
        self.instance_attention = GatedScore(hidden, attn_hidden) if gated else AttentionScore(hidden, attn_hidden, "tanh")
        self.cluster_attention = GatedScore(hidden, attn_hidden) if gated else AttentionScore(hidden, attn_hidden, "tanh")
        self.head = classifier_head(hidden, dropout, num_classes)


    @torch.jit.export
    def forward_attention(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits and the maps' weights, per location [B, N] as the other models give them.

        ``instance``: the first attention level (within each cluster when hierarchical, over the bag when flat);
        ``patch``: each location's share of the slide embedding; ``cluster`` [B, K]: the cluster attention
        (hierarchical) or the patch weight per cluster (flat). In ``instances`` mode a location's scales are
        separate instances, so its weights are summed over them. ``scale`` [B, N, S]: these models have no
        cross-scale attention; the weights say where a location's evidence came from: one-hot on the selected
        scale (``select``), uniform (``sum``, ``concat``: every scale enters alike), or each scale instance's share
        of the location's patch weight (``instances``).
        """
        x, mask = self.prepare(x, mask)
        b, s, n, _ = x.shape
        k = self.num_clusters
        inst, imask = combine_scales(x, mask, self.scale_mode, self.scale, k)
        h = self.encoder(inst)  # [B, N', H]
        if self.hierarchical:
            a_inst, a_clu, slide = self.pool_clusters(h, imask)  # [B, K, N'/K], [B, K], [B, H]
            patch = (a_inst * a_clu.unsqueeze(-1)).reshape(b, -1)
            a_inst = a_inst.reshape(b, -1)
        else:
            a_inst, slide = attention_pool(h, self.instance_attention(h), imask)
            patch = a_inst
            a_clu = torch.zeros(b, k, dtype=x.dtype, device=x.device)  # set from the per-location weights below
        logits = self.head(slide)
        if self.scale_mode == "instances":  # slots per cluster: M locations x S scales (see combine_scales)
            per_scale = patch.reshape(b, k, n // k, s)
            patch = per_scale.sum(dim=-1).reshape(b, n)
            a_inst = a_inst.reshape(b, k, n // k, s).sum(dim=-1).reshape(b, n)
            scale = (per_scale / per_scale.sum(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(b, n, s)
        else:
            scale = view_scale_weights(self.scale_mode, self.scale, x)
        if not self.hierarchical:
            a_clu = cluster_mass(patch, k)
        return logits, {"scale": scale, "instance": a_inst, "cluster": a_clu, "patch": patch}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, num_classes] of bags ``x`` [B, S, N, D] with optional ``mask`` [B, N]."""
        return self.forward_attention(x, mask)[0]
