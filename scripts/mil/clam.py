"""CLAM-SB: clustering-constrained attention MIL, single attention branch (Lu et al., Nature Biomedical Engineering
2021), with the published "small" sizes and defaults: instance embedding ``Linear(D_in, 512) - ReLU - Dropout(0.25)``,
gated attention network (512 -> 256 -> 1, dropout on both branches), a linear bag classifier on the attention-pooled
embedding, and one instance classifier (512 -> 2) per class for the instance-level clustering loss.

The clustering loss (published defaults: ``k_sample`` 8, cross-entropy, ``bag_weight`` 0.7): in training, for the bag's
class, the k most attended real instances are pseudo-labelled positive and the k least attended negative, and that
class's instance classifier learns them; with more than two classes (CLAM's subtyping setting) the other classes'
classifiers also learn the k most attended as negative. The loss is
``bag_weight * bag cross-entropy + (1 - bag_weight) * instance loss``. It needs the slide label, which a forward pass
does not see: in training, :meth:`CLAMSB.forward` keeps the instance embeddings and attention of its last call and
:class:`scripts.mil.losses.MILLoss` (``loss`` in configs/train.yaml) asks :meth:`CLAMSB.combine_loss` for the total.
Validation, inference and the Deploy export run the bag stream alone (as CLAM evaluates).

Scale views as :mod:`scripts.mil.abmil`: ``clam_sb_20x`` (one scale) and ``clam_sb_concat`` (concatenated per
location). Maps: the attention weights; scale weights one-hot / uniform.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from scripts.mil import recipe
from scripts.mil.base import MILBase, combine_scales, view_dim, view_scale_weights
from scripts.mil.pooling import GatedScore, attention_pool, cluster_mass


class CLAMSB(MILBase):
    """CLAM-SB on one scale view (see the module docstring)."""

    __jit_ignored_attributes__ = ["_last"]

    def __init__(self, in_features: int = 2048, num_scales: int = 3, num_clusters: int = 8, scale_mode: str = "select",
                 scale: int = 0, hidden: int = 512, attn_hidden: int = 256, dropout: float = 0.25, num_classes: int = 2,
                 k_sample: int = 8, bag_weight: float = 0.7) -> None:
        super().__init__(in_features, num_scales, num_clusters)
        self.scale_mode, self.scale, self.k_sample, self.bag_weight = scale_mode, scale, k_sample, bag_weight
        self.embed = nn.Sequential(nn.Linear(view_dim(in_features, num_scales, scale_mode), hidden), nn.ReLU(),
                                   nn.Dropout(dropout) if dropout > 0 else nn.Identity())
        self.attention = GatedScore(hidden, attn_hidden, dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(num_classes)])
        self._last = []  # training only (a list of tensors; not part of TorchScript): instance embeddings, attention, mask of the last call

    @torch.jit.ignore
    def published_recipe(self) -> Optional[recipe.TrainingRecipe]:
        """CLAM's published optimiser (:data:`scripts.mil.recipe.CLAM`)."""
        return recipe.CLAM

    def _bag(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, mask = self.prepare(x, mask)
        inst, imask = combine_scales(x, mask, self.scale_mode, self.scale, self.num_clusters)
        h = self.embed(inst)
        w, z = attention_pool(h, self.attention(h), imask)
        return self.classifier(z), h, w, imask

    @torch.jit.export
    def forward_attention(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits [B, C] and the maps' weights (``patch`` / ``instance``: the attention; ``cluster``; ``scale``)."""
        logits, _, w, _ = self._bag(x, mask)
        return logits, {"scale": view_scale_weights(self.scale_mode, self.scale, x), "instance": w, "patch": w,
                        "cluster": cluster_mass(w, self.num_clusters)}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, num_classes]; in training also keeps what the clustering loss needs (see the module docstring)."""
        logits, h, w, m = self._bag(x, mask)
        if self.training and not torch.jit.is_scripting():
            self._keep(h, w, m)
        return logits

    @torch.jit.unused
    def _keep(self, h: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> None:
        self._last = [h, w, m]

    @torch.jit.unused
    def instance_loss(self, label: torch.Tensor) -> torch.Tensor:
        """The clustering loss of the last training forward for slide labels ``label`` [B] (mean over bags)."""
        if not self._last:
            raise RuntimeError("CLAM-SB's instance loss needs a training forward pass first")
        h, w, m = self._last
        self._last = []
        b, n, _ = h.shape
        k = max(1, min(self.k_sample, n // 2))
        top = w.masked_fill(~m, -1.0).topk(k, dim=1).indices  # most attended real instances
        bottom = w.masked_fill(~m, 2.0).topk(k, dim=1, largest=False).indices  # least attended
        rows = torch.arange(b, device=h.device).unsqueeze(1)
        ids = torch.cat([top, bottom], dim=1)  # [B, 2k]
        hs, valid = h[rows, ids], m[rows, ids].to(h.dtype)  # a masked slot picked in a short bag weighs 0
        c = len(self.instance_classifiers)
        logits = torch.stack([clf(hs) for clf in self.instance_classifiers], dim=1)  # [B, C, 2k, 2]
        in_class = torch.cat([torch.ones(b, k, dtype=torch.long, device=h.device), torch.zeros(b, k, dtype=torch.long, device=h.device)], 1)
        ce = nn.functional.cross_entropy
        own = logits[torch.arange(b, device=h.device), label]  # [B, 2k, 2]: the bag's class, top positive, bottom negative
        loss = (ce(own.reshape(-1, 2), in_class.reshape(-1), reduction="none").reshape(b, -1) * valid).sum(1) / valid.sum(1).clamp_min(1)
        if c > 2:  # subtyping: the other classes' classifiers see the top k as negative; averaged over classes
            other = torch.ones(b, c, dtype=torch.bool, device=h.device)
            other[torch.arange(b, device=h.device), label] = False
            neg = ce(logits[:, :, :k].reshape(-1, 2), torch.zeros(b * c * k, dtype=torch.long, device=h.device), reduction="none")
            neg = (neg.reshape(b, c, k) * valid[:, None, :k]).sum(-1) / valid[:, None, :k].sum(-1).clamp_min(1)
            loss = (loss + (neg * other).sum(1)) / c
        return loss.mean()

    @torch.jit.unused
    def combine_loss(self, bag_loss: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``bag_weight * bag_loss + (1 - bag_weight) * instance loss`` (CLAM's total loss)."""
        return self.bag_weight * bag_loss + (1.0 - self.bag_weight) * self.instance_loss(label)
