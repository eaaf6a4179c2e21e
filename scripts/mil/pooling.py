"""Pooling and head modules every MIL model of the bundle shares: masked softmax and the one attention-pooling step,
the attention scores (plain ``w^T tanh(V h)`` and gated), hierarchical pooling (instances inside each phenotype
cluster, then clusters: CS-MIL, DeepAttnMISL), critical-instance pooling (DSMIL), the MLP head, and the patch
weight per cluster of the maps."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` ignoring masked entries; rows with no valid entry get all zeros."""
    scores = scores.masked_fill(~mask, -1e4)
    w = torch.softmax(scores, dim=dim) * mask.to(scores.dtype)
    return w / w.sum(dim=dim, keepdim=True).clamp_min(1e-12)


def attention_pool(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention pooling over the last-but-one axis: ``values`` [..., N, H], ``scores`` and ``mask`` [..., N] ->
    weights [..., N] (masked softmax) and the weighted sum [..., H]. The one pooling step of CS-MIL, the
    attention baselines and the fusion ablation (hierarchical pooling applies it inside clusters, then over them).
    """
    w = masked_softmax(scores, mask, dim=-1)
    return w, (w.unsqueeze(-1) * values).sum(dim=-2)


class AttentionScore(nn.Module):
    """``w^T act(V h)``: hidden -> attn_hidden -> 1 score per instance."""

    def __init__(self, hidden: int, attn_hidden: int, activation: str = "tanh") -> None:
        super().__init__()
        acts = {"tanh": nn.Tanh(), "relu": nn.ReLU()}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        self.net = nn.Sequential(nn.Linear(hidden, attn_hidden), acts[activation], nn.Linear(attn_hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


class GatedScore(nn.Module):
    """Gated attention score ``w^T (tanh(V h) * sigmoid(U h))`` (Ilse et al., 2018); ``dropout`` on both branches
    as CLAM's gated attention network has it (0: none, the parameters are the same either way)."""

    def __init__(self, hidden: int, attn_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.v, self.u, self.w = nn.Linear(hidden, attn_hidden), nn.Linear(hidden, attn_hidden), nn.Linear(attn_hidden, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.drop(torch.tanh(self.v(h))) * self.drop(torch.sigmoid(self.u(h)))).squeeze(-1)


def classifier_head(hidden: int, dropout: float, num_classes: int) -> nn.Sequential:
    """The MLP head of CS-MIL and the attention baselines: ``Linear(hidden, 32) - ReLU - Dropout - Linear(32, C)``."""
    return nn.Sequential(nn.Linear(hidden, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, num_classes))


class HierarchicalPool:
    """Mixin of models (and pooling modules) with ``num_clusters``, ``instance_attention`` and
    ``cluster_attention``: the paper's two-level attention pooling, written once."""

    def pool_clusters(self, values: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``values`` [B, N, H] cluster-major, ``mask`` [B, N] -> instance weights within each cluster [B, K, N/K],
        cluster weights [B, K] and the slide embedding [B, H]."""
        b, n, h = values.shape
        k = self.num_clusters
        if n % k != 0:
            raise ValueError(f"bag slots ({n}) must be a multiple of num_clusters ({k})")
        vk, mk = values.reshape(b, k, n // k, h), mask.reshape(b, k, n // k)
        a_inst, clusters = attention_pool(vk, self.instance_attention(vk), mk)
        a_clu, slide = attention_pool(clusters, self.cluster_attention(clusters), mk.any(dim=-1))
        return a_inst, a_clu, slide


def cluster_mass(weights: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Patch weights [B, N] of a cluster-major bag summed per phenotype cluster [B, K] (uniform if N % K != 0)."""
    b, n = weights.shape
    if n % num_clusters == 0:
        return weights.reshape(b, num_clusters, n // num_clusters).sum(dim=-1)
    return torch.ones(b, num_clusters, device=weights.device, dtype=weights.dtype) / num_clusters


class CriticalInstancePooling(nn.Module):
    """Dual-stream MIL pooling (DSMIL) of instance embeddings ``h`` [B, N, H] with ``mask`` [B, N].

    Returns logits [B, C], instance weights [B, N] (softmax of the class-1 margin of the instance classifier
    over the bag's real instances) and bag attention [B, N] (similarity to the critical instance). With C > 2
    classes every class has its own critical instance and bag-stream attention, as DSMIL's (a class's bag logit
    from its own attention-pooled embedding); the weights returned are those of the predicted class, and
    :meth:`class_weights` gives every class's.
    """

    def __init__(self, hidden: int, num_classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.instance_classifier = nn.Linear(hidden, num_classes)
        self.query = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.bag_classifier = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = h.shape[0]
        rows = torch.arange(b, device=h.device)
        inst_logits = self.instance_classifier(h)  # [B, N, C]
        q = self.query(h)
        if self.num_classes > 2:
            crit_c = inst_logits.masked_fill(~mask.unsqueeze(-1), -1e4).argmax(dim=1)  # [B, C]: one per class
            max_c = inst_logits.gather(1, crit_c.unsqueeze(1)).squeeze(1)  # [B, C]
            q_crit = q.gather(1, crit_c.unsqueeze(-1).expand(b, crit_c.shape[1], q.shape[-1]))  # [B, C, H]
            scores_c = torch.einsum("bnh,bch->bcn", q, q_crit) / (q.shape[-1] ** 0.5)
            a_c = masked_softmax(scores_c, mask.unsqueeze(1), dim=-1)  # [B, C, N]
            bag_c = torch.einsum("bcn,bnh->bch", a_c, self.value(h))
            logits_c = 0.5 * (max_c + (bag_c * self.bag_classifier.weight).sum(-1) + self.bag_classifier.bias)
            pred = logits_c.argmax(dim=-1)
            w_c = self.class_weights(h, mask)
            return logits_c, w_c[rows, :, pred], a_c[rows, pred]
        crit = inst_logits[..., -1].masked_fill(~mask, -1e4).argmax(dim=1)  # critical instance per bag
        max_logits = inst_logits[rows, crit]
        scores = (q * q[rows, crit].unsqueeze(1)).sum(-1) / (q.shape[-1] ** 0.5)
        a = masked_softmax(scores, mask, dim=-1)
        bag = (a.unsqueeze(-1) * self.value(h)).sum(dim=1)
        weights = masked_softmax(inst_logits[..., -1] - inst_logits[..., 0], mask, dim=-1)
        return 0.5 * (max_logits + self.bag_classifier(bag)), weights, a

    def class_weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Instance weights [B, N, C] per class: softmax over the bag of the instance classifier's margin of the class
        (``logit_c - logsumexp`` of the others; for two classes column 1 is the weights :meth:`forward` returns)."""
        inst = self.instance_classifier(h)
        eye = torch.eye(inst.shape[-1], dtype=torch.bool, device=h.device)
        others = torch.logsumexp(inst.unsqueeze(-2).masked_fill(eye, -1e4), dim=-1)  # [B, N, C]
        return masked_softmax(inst - others, mask.unsqueeze(-1), dim=1)


class HierarchicalAttentionPooling(HierarchicalPool, nn.Module):
    """The paper's pooling (as :class:`scripts.mil.networks.CSMIL` pools): attention over the instances inside
    each of the K clusters, then over clusters, then the MLP head. Used by the ablation that keeps the joint
    fusion and swaps critical-instance pooling for this one. Returns logits, patch weights, cluster weights."""

    def __init__(self, hidden: int, attn_hidden: int, num_clusters: int, num_classes: int = 2, dropout: float = 0.5) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.instance_attention = AttentionScore(hidden, attn_hidden, "tanh")
        self.cluster_attention = AttentionScore(hidden, attn_hidden, "tanh")
        self.head = classifier_head(hidden, dropout, num_classes)

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a_inst, a_clu, slide = self.pool_clusters(f, mask)
        return self.head(slide), (a_inst * a_clu.unsqueeze(-1)).reshape(f.shape[0], f.shape[1]), a_clu

    def class_weights(self, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch weights [B, N, C]: attention is shared by the classes (the same column for each)."""
        a_inst, a_clu, _ = self.pool_clusters(f, mask)
        w = (a_inst * a_clu.unsqueeze(-1)).reshape(f.shape[0], f.shape[1])
        return w.unsqueeze(-1).expand(w.shape[0], w.shape[1], self.head[-1].out_features)


