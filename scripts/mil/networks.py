"""CS-MIL: cross-scale attention multiple-instance learning (Deng et al., 2022).

Input ``x`` is a batch of bags ``[B, S, N, D]``: S scales, N instance slots laid out cluster-major
(``N = num_clusters * per_cluster``), D-dim patch features; ``mask`` ``[B, N]`` marks real instances.

1. MI-FCN instance encoder (DeepAttnMISL): ``h = ReLU(W x)``, D -> ``hidden``; shared by all clusters and
   scales, or one per cluster (``share_instance_encoder=False``).
2. Cross-scale attention for each location: ``a_s = softmax_s(w^T act(V h_s))``, ``f = sum_s a_s h_s``;
   one kernel ``(V, w)`` for all scales or one per scale; ``act`` ReLU (paper's best) or Tanh;
   ``scale_softmax=False`` keeps raw weights as the public reference code does.
3. Attention pooling (``Linear-Tanh-Linear``): ``hierarchical`` pools instances inside each cluster, then
   clusters (paper); ``flat`` pools all instances at once (reference code). Masked slots get weight 0.
4. Head: ``Linear(hidden, 32) - ReLU - Dropout - Linear(32, num_classes)`` -> logits.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from scripts.mil.base import MILBase
from scripts.mil.pooling import AttentionScore, HierarchicalPool, attention_pool, classifier_head


class CSMIL(HierarchicalPool, MILBase):
    """Cross-scale attention MIL network.

    Args:
        in_features: patch feature size D (2048 for ResNet-50).
        num_scales: S.
        num_clusters: K (slots per bag must be a multiple of it).
        hidden: MI-FCN output size (64 in the paper).
        attn_hidden: attention hidden size (32).
        share_scale_kernel: one cross-scale attention kernel for all scales (paper's best) or one per scale.
        scale_activation: ``relu`` (paper's best) or ``tanh``.
        scale_softmax: normalise scale weights with softmax (paper) or keep raw scores (reference code).
        pooling: ``hierarchical`` (instances in clusters, then clusters) or ``flat``.
        share_instance_encoder: one MI-FCN for all clusters or one per cluster.
        dropout: dropout before the last layer.
        num_classes: output logits.
    """

    def __init__(
        self,
        in_features: int = 2048,
        num_scales: int = 3,
        num_clusters: int = 8,
        hidden: int = 64,
        attn_hidden: int = 32,
        share_scale_kernel: bool = True,
        scale_activation: str = "relu",
        scale_softmax: bool = True,
        pooling: str = "hierarchical",
        share_instance_encoder: bool = True,
        dropout: float = 0.5,
        num_classes: int = 2,
    ) -> None:
        super().__init__(in_features, num_scales, num_clusters)  # input standardisation (MILBase)
        if pooling not in ("hierarchical", "flat"):
            raise ValueError(f"pooling must be 'hierarchical' or 'flat', got {pooling!r}")
        self.hierarchical = pooling == "hierarchical"
        self.share_instance_encoder = share_instance_encoder
        self.scale_softmax = scale_softmax
        n_enc = 1 if share_instance_encoder else num_clusters
        self.enc_weight = nn.Parameter(torch.empty(n_enc, in_features, hidden))
        self.enc_bias = nn.Parameter(torch.zeros(n_enc, hidden))
        for k in range(n_enc):  # same init as nn.Linear
            nn.init.kaiming_uniform_(self.enc_weight.data[k].T, a=5**0.5)
        self.scale_attention = nn.ModuleList(
            [AttentionScore(hidden, attn_hidden, scale_activation) for _ in range(1 if share_scale_kernel else num_scales)]
        )
        self.instance_attention = AttentionScore(hidden, attn_hidden, "tanh")
        self.cluster_attention = AttentionScore(hidden, attn_hidden, "tanh")
        self.head = classifier_head(hidden, dropout, num_classes)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised bags [B, S, N, D] -> MI-FCN embeddings [B, S, N, H]."""
        b, s, n, d = x.shape
        if self.share_instance_encoder:
            h = torch.matmul(x, self.enc_weight[0]) + self.enc_bias[0]
        else:
            m = n // self.num_clusters
            xk = x.reshape(b, s, self.num_clusters, m, d)
            h = torch.einsum("bskmd,kdh->bskmh", xk, self.enc_weight) + self.enc_bias[None, None, :, None, :]
            h = h.reshape(b, s, n, -1)
        return torch.relu(h)

    def _scale_weights(self, h: torch.Tensor) -> torch.Tensor:
        """[B, S, N, H] -> weights [B, N, S]."""
        scores = []
        if len(self.scale_attention) == 1:
            for att in self.scale_attention:  # TorchScript: iterate, no dynamic ModuleList indexing
                for s in range(self.num_scales):
                    scores.append(att(h[:, s]))
        else:
            for s, att in enumerate(self.scale_attention):
                scores.append(att(h[:, s]))
        a = torch.stack(scores, dim=-1)
        return torch.softmax(a, dim=-1) if self.scale_softmax else a

    @torch.jit.export
    def forward_attention(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits [B, C] and attention: ``scale`` [B, N, S], ``instance`` [B, N], ``cluster`` [B, K],
        ``patch`` [B, N] (each instance's share of the slide embedding)."""
        x, mask = self.prepare(x, mask)
        b, _, n, _ = x.shape
        h = self._encode(x)  # [B, S, N, H]
        a_scale = self._scale_weights(h)  # [B, N, S]
        f = (h * a_scale.permute(0, 2, 1).unsqueeze(-1)).sum(dim=1)  # [B, N, H]
        if self.hierarchical:
            a_inst, a_clu, slide = self.pool_clusters(f, mask)  # [B, K, M], [B, K], [B, H]
            patch = (a_inst * a_clu.unsqueeze(-1)).reshape(b, n)
            a_inst = a_inst.reshape(b, n)
        else:
            a_inst, slide = attention_pool(f, self.instance_attention(f), mask)  # [B, N]
            a_clu = torch.ones(b, self.num_clusters, device=x.device, dtype=x.dtype) / self.num_clusters
            patch = a_inst
        logits = self.head(slide)
        return logits, {"scale": a_scale, "instance": a_inst, "cluster": a_clu, "patch": patch}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, num_classes] of bags ``x`` [B, S, N, D] with optional ``mask`` [B, N]."""
        return self.forward_attention(x, mask)[0]
