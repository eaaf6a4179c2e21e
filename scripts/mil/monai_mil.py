"""MONAI's ``monai.networks.nets.MILModel`` heads (``att``, ``att_trans``, ``att_trans_pyramid``; MONAI's pathology
MIL tutorial) on the bundle's precomputed patch features.

``MILModel`` runs an image backbone on every patch and its head on the backbone's features; here the features are
already extracted, so:

* ``att`` and ``att_trans`` are built by ``MILModel`` itself with a custom backbone, and its modules are used as
  built (``net``: the backbone, ``attention``: ``Linear(nfc, 2048) - Tanh - Linear(2048, 1)``, ``transformer``:
  ``nn.TransformerEncoder`` of 4 blocks, 8 heads, dropout 0, ``myfc``: the classifier). ``att``'s backbone is the
  identity: the features are what MONAI's ResNet-50 backbone would hand over. ``att_trans``'s backbone is a learned
  ``Linear(D_in, 256) - ReLU``: MONAI runs the transformer at the backbone's width (2048 for its ResNet-50; 6144 for
  three concatenated scales, some 700 M parameters), and 256 is the width MONAI's own pyramid transformers use.
* ``MILModel.forward`` has no mask and takes images [B, N, C, H, W]; the forward here applies the same modules with
  a masked softmax for the attention and ``src_key_padding_mask`` for the transformer, so empty bag slots do not
  count (tested), and is TorchScript-exportable (``MILModel.forward`` with its hooks is not).
* ``att_trans_pyramid`` does not fit: MONAI builds it only on a torchvision ResNet, whose four stages' pooled
  features (256 / 512 / 1024 / 2048 channels, captured by forward hooks) feed transformers one after the other, and
  refuses a custom backbone. Precomputed features have no stages, but they have scales: ``monai_att_trans_pyramid``
  keeps MONAI's layout with the magnifications as the pyramid's levels, finest first (20x, then 10x, then 5x):
  ``x = T_0(P_0(x_20x))``, then ``x = T_i(P_i([x, x_level]))`` for each coarser level, each ``T`` MONAI's
  transformer block stack at width 256 and each ``P`` a linear projection to 256 (MONAI's last stage runs at
  256 + 2048 without projection; here it is projected like the middle stages, for the same reason as above), then
  MONAI's attention pooling and classifier.

Scale views as :mod:`scripts.mil.abmil` (``monai_att_20x`` / ``_concat``, ``monai_att_trans_20x`` / ``_concat``); the
pyramid sees every scale. Maps: the attention weights; scale weights one-hot / uniform (the pyramid: uniform, its
scales enter through separate stages with no per-location weight).
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
from monai.networks.nets import MILModel
from torch import nn

from scripts.mil import recipe
from scripts.mil.base import MILBase, combine_scales, view_dim, view_scale_weights
from scripts.mil.pooling import attention_pool, cluster_mass

#: transformer width of the att_trans backbone and of the pyramid (MONAI's pyramid width)
WIDTH = 256


def _encoder(width: int, blocks: int, dropout: float) -> nn.TransformerEncoder:
    """MONAI's transformer stack (``nn.TransformerEncoder`` of ``TransformerEncoderLayer(d_model, nhead=8)``)."""
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=width, nhead=8, dropout=dropout), num_layers=blocks,
                                 enable_nested_tensor=False)


class PyramidLevel(nn.Module):
    """One level of the pyramid: project ``[x, level features]`` (the first level: its features alone) to the
    width, then MONAI's transformer stack."""

    def __init__(self, in_features: int, first: bool, blocks: int, dropout: float) -> None:
        super().__init__()
        self.first = first
        self.proj = nn.Linear(in_features if first else WIDTH + in_features, WIDTH)
        self.encoder = _encoder(WIDTH, blocks, dropout)

    def forward(self, h: torch.Tensor, level: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.proj(level if self.first else torch.cat([h, level], dim=-1))
        return self.encoder(h.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)


class MONAIMIL(MILBase):
    """MONAI ``MILModel`` heads on precomputed features (see the module docstring)."""

    def __init__(self, in_features: int = 2048, num_scales: int = 3, num_clusters: int = 8, mil_mode: str = "att",
                 scale_mode: str = "select", scale: int = 0, trans_blocks: int = 4, trans_dropout: float = 0.0,
                 num_classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__(in_features, num_scales, num_clusters)
        if mil_mode not in ("att", "att_trans", "att_trans_pyramid"):
            raise ValueError(f"mil_mode must be att, att_trans or att_trans_pyramid, got {mil_mode!r}")
        self.mil_mode, self.scale_mode, self.scale = mil_mode, scale_mode, scale
        self.pyramid = mil_mode == "att_trans_pyramid"
        if self.pyramid:  # MONAI's layout, levels = scales (see the module docstring)
            self.scale_mode = "concat"
            self.net = nn.Identity()
            self.transformer = nn.ModuleList()
            self.levels = nn.ModuleList([PyramidLevel(in_features, i == 0, trans_blocks, trans_dropout) for i in range(num_scales)])
            self.attention = nn.Sequential(nn.Linear(WIDTH, 2048), nn.Tanh(), nn.Linear(2048, 1))
            self.myfc = nn.Linear(WIDTH, num_classes)
            return
        d = view_dim(in_features, num_scales, scale_mode)
        backbone = nn.Identity() if mil_mode == "att" else nn.Sequential(nn.Linear(d, WIDTH), nn.ReLU())
        with warnings.catch_warnings():  # torch's note that a seq-first encoder cannot use nested tensors
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            mil = MILModel(num_classes, mil_mode=mil_mode, pretrained=False, backbone=backbone,
                           backbone_num_features=d if mil_mode == "att" else WIDTH, trans_blocks=trans_blocks,
                           trans_dropout=trans_dropout)
        self.net, self.attention, self.myfc = mil.net, mil.attention, mil.myfc
        self.transformer = nn.ModuleList([mil.transformer] if mil.transformer is not None else [])
        self.levels = nn.ModuleList()
        for layer in self.transformer:
            layer.enable_nested_tensor = False  # masks go in as src_key_padding_mask (same results, one code path)

    @torch.jit.ignore
    def published_recipe(self) -> Optional[recipe.TrainingRecipe]:
        """MONAI's MIL tutorial optimiser; the transformer blocks (``transformer``, the pyramid's ``levels``) are its
        transformer group."""
        return recipe.monai_recipe(tuple(n for n in ("transformer", "levels") if len(getattr(self, n)) > 0))

    def _tokens(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Standardised bags [B, S, N, D] -> per-location tokens [B, N, width] before the attention pooling."""
        pad = ~mask
        if self.pyramid:
            h = x[:, 0]
            for i, level in enumerate(self.levels):
                h = level(h, x[:, i], pad)
            return h
        inst, _ = combine_scales(x, mask, self.scale_mode, self.scale, self.num_clusters)
        h = self.net(inst)
        for enc in self.transformer:
            h = enc(h.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)
        return h

    @torch.jit.export
    def forward_attention(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits [B, C] and the maps' weights (``patch`` / ``instance``: the attention; ``cluster``; ``scale``)."""
        x, mask = self.prepare(x, mask)
        h = self._tokens(x, mask)
        w, z = attention_pool(h, self.attention(h).squeeze(-1), mask)
        return self.myfc(z), {"scale": view_scale_weights(self.scale_mode, self.scale, x), "instance": w, "patch": w,
                              "cluster": cluster_mass(w, self.num_clusters)}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, num_classes] of bags ``x`` [B, S, N, D] with optional ``mask`` [B, N]."""
        return self.forward_attention(x, mask)[0]
