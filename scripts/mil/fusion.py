"""CS-MIL-joint: cross-scale attention that keeps co-located evidence (``csmil_joint``; ``--mil_model csmil_joint``).

Why a new fusion (docs/evaluation.md, "Cross-scale fusion", with the numbers: on co-location cohorts it is level
with the concatenation baseline ``dsmil`` within the seed spread and far above the paper's CS-MIL - most of that
through its pooling - but below ``dsmil``, the default, on the demo): the paper's CS-MIL passes every scale through the
MI-FCN's ReLU on its own and then averages the scales with softmax weights, ``f = sum_s a_s ReLU(W x_s)``. Each
hidden unit therefore responds to one scale at a time, and the weights compete: giving the 5x ring more weight
takes weight from the 20x texture. A cue that is diagnostic only when two scales show their part at the same
location (a conjunction) has no unit that fires for it. Here the cross-scale attention weights the scales'
*projections* and the ReLU comes after the sum::

    u_s = W_s x_s                                        per-scale MI-FCN projection (one per scale: each scale
                                                         has its own encoder and feature space)
    a   = softmax_s( w^T tanh(V (u_s + e_s)) )           cross-scale attention per location (learned scale
                                                         embedding e_s)
    f   = ReLU( sum_s S a_s u_s + b )                    joint embedding of the location

With uniform weights ``f`` is the concatenation baseline's embedding (``ReLU(W [x_1 .. x_S] + b)``), so a hidden
unit can threshold evidence summed over scales (texture at 20x *and* ring at 5x); the attention re-weights the
scales per location and its weights are the per-scale weights of the maps.

Locations are pooled by critical-instance (dual-stream) pooling (Li et al., CVPR 2021): an instance classifier
scores every location, the best-scoring one is the critical instance, and attention by similarity to it builds
the bag embedding; the logits average the two streams. A slide label that means "at least one lesion" is what
max-style pooling models; attention pooling dilutes a few lesion locations among many (the ablation in
docs/evaluation.md separates the two effects). The patch weights of the maps are a softmax of the instance
classifier's class-1 margin over the bag: where the critical-instance stream looks.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from scripts.mil.base import MILBase
from scripts.mil.pooling import AttentionScore, CriticalInstancePooling, HierarchicalAttentionPooling, cluster_mass


class JointScaleMIL(MILBase):
    """CS-MIL-joint (see the module docstring): joint cross-scale attention + critical-instance pooling.

    Same interface as :class:`scripts.mil.networks.CSMIL`: bags ``x`` [B, S, N, D] (cluster-major slots),
    optional ``mask`` [B, N]; ``forward`` -> logits [B, C]; ``forward_attention`` -> logits and ``scale``
    [B, N, S] (cross-scale attention, rows sum to 1), ``instance`` and ``patch`` [B, N] (critical-instance
    weights, sum to 1 over real instances), ``cluster`` [B, K] (the patch weight falling in each phenotype
    cluster), ``bag`` [B, N] (the bag stream's attention).

    Args:
        in_features: patch feature size D.
        num_scales: S.
        num_clusters: K (bags are drawn evenly from the K phenotype clusters).
        hidden: embedding size (64, the paper's MI-FCN size).
        attn_hidden: cross-scale attention hidden size (32).
        dropout: dropout on the bag stream's values (critical pooling; default 0, as DSMIL) or before the head's
            last layer (hierarchical pooling; default 0.5, as CS-MIL).
        num_classes: output logits.
        fusion: ``joint`` (ReLU after the weighted sum: this model) or ``paper`` (ReLU per scale, then the
            weighted average, as CS-MIL fuses; same projections and attention): an ablation.
        pooling: ``critical`` (this model) or ``hierarchical`` (the paper's attention pooling): an ablation.
    """

    def __init__(
        self, in_features: int = 2048, num_scales: int = 3, num_clusters: int = 8, hidden: int = 64, attn_hidden: int = 32,
        dropout: Optional[float] = None, num_classes: int = 2, fusion: str = "joint", pooling: str = "critical",
    ) -> None:
        super().__init__(in_features, num_scales, num_clusters)  # input standardisation (MILBase)
        if fusion not in ("joint", "paper") or pooling not in ("critical", "hierarchical"):
            raise ValueError(f"fusion must be joint|paper and pooling critical|hierarchical, got {fusion!r}, {pooling!r}")
        self.joint = fusion == "joint"
        # The per-scale projections start as the concatenation baseline's embedding: one nn.Linear over the S
        # concatenated scales (its default init, drawn first, then the pooling, as DSMIL draws them), cut into S
        # blocks; with the zero-initialised score layer below, csmil_joint at initialisation *is* dsmil under the
        # same seed, and the cross-scale attention moves away from uniform only where that lowers the loss.
        concat = nn.Linear(in_features * num_scales, hidden)
        self.scale_weight = nn.Parameter(concat.weight.detach().t().reshape(num_scales, in_features, hidden).clone())
        self.bias = nn.Parameter(concat.bias.detach().clone())
        if pooling == "critical":
            self.pool = CriticalInstancePooling(hidden, num_classes, 0.0 if dropout is None else dropout)
        else:
            self.pool = HierarchicalAttentionPooling(hidden, attn_hidden, num_clusters, num_classes, 0.5 if dropout is None else dropout)
        self.scale_embedding = nn.Parameter(torch.randn(num_scales, hidden) * 0.02)
        self.scale_attention = AttentionScore(hidden, attn_hidden, "tanh")
        nn.init.zeros_(self.scale_attention.net[-1].weight)  # uniform scale weights at initialisation
        nn.init.zeros_(self.scale_attention.net[-1].bias)
        self.critical = pooling == "critical"


    def _fuse(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Standardised [B, S, N, D] -> joint embeddings [B, N, H] and cross-scale attention [B, N, S]."""
        u = torch.einsum("bsnd,sdh->bnsh", x, self.scale_weight)  # [B, N, S, H]
        a = torch.softmax(self.scale_attention(u + self.scale_embedding), dim=-1)  # [B, N, S]
        if self.joint:
            return torch.relu((a.unsqueeze(-1) * u).sum(dim=2) * self.num_scales + self.bias), a
        return (a.unsqueeze(-1) * torch.relu(u * self.num_scales + self.bias)).sum(dim=2), a

    @torch.jit.export
    def forward_attention(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits [B, C] and the attention dict described in the class docstring."""
        x, mask = self.prepare(x, mask)
        f, a_scale = self._fuse(x)
        logits, weights, extra = self.pool(f, mask)
        per_class = self.pool.class_weights(f, mask)
        if not self.critical:  # ablation: extra = cluster weights
            return logits, {"scale": a_scale, "instance": weights, "cluster": extra, "patch": weights, "bag": weights, "patch_class": per_class}
        return logits, {"scale": a_scale, "instance": weights, "cluster": cluster_mass(weights, self.num_clusters), "patch": weights, "bag": extra,
                        "patch_class": per_class}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, num_classes] of bags ``x`` [B, S, N, D] with optional ``mask`` [B, N]."""
        return self.forward_attention(x, mask)[0]
