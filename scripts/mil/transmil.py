"""TransMIL (Shao et al., NeurIPS 2021) with the published defaults: ``Linear(D_in, 512) - ReLU``, a class token, two
Transformer layers of Nyström attention (8 heads of 64, 256 landmarks, 6 pseudo-inverse iterations, a depthwise
residual convolution of 33 over the values, dropout 0.1) with the PPEG positional encoding between them (depthwise
7x7, 5x5 and 3x3 convolutions on the instances laid out on a square grid), LayerNorm and a linear classifier on the
class token.

Written here because no library in the bundle's dependencies has it: the reference code imports the
``nystrom-attention`` package, which the bundle does not depend on, and the model must script to TorchScript for
the Deploy export. The layers follow the papers (Xiong et al., AAAI 2021 for the Nyström approximation).

Differences from the reference code, each for a reason:

* **Masks.** Bags have empty slots (short phenotype clusters). Masked tokens are zeroed before attention and before
  PPEG, excluded as keys, and the landmarks are means over real tokens only, so what an empty slot holds never
  changes the output (tested).
* **Fewer tokens than landmarks.** With n <= 256 tokens (a bag of 8 clusters x 8 slots has 65 with the class
  token), the reference pads the sequence to 256 landmarks, each one token: the approximation is then exact
  softmax attention up to the pseudo-inverse iterations. Here such bags use exact softmax attention directly
  (the same result without 256 x 256 inverses per head); longer bags use the Nyström approximation.
* **Pseudo-inverse scaling** per bag (the reference scales by the maximum over the whole batch), so a bag's output
  does not depend on the bags it is batched with.
* **Square padding** repeats the first instances (as the reference does) with their mask.

TransMIL is not invariant to the order of instances (PPEG convolves neighbours on the grid); bags are cluster-major,
so the grid groups phenotypes. Maps: the class token's attention over the instances in the second layer (mean
over heads; a repeated instance's weight goes back to its slot); scale weights one-hot / uniform per view.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from scripts.mil import recipe
from scripts.mil.base import MILBase, combine_scales, view_dim, view_scale_weights
from scripts.mil.pooling import cluster_mass


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of the (softmax) matrices ``a`` [..., m, m] by the iteration of Razavi et al.
    (2014) that Nyströmformer uses, scaled per matrix."""
    abs_a = a.abs()
    scale = abs_a.sum(-1).amax(-1, keepdim=True).unsqueeze(-1) * abs_a.sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-1, -2) / scale
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with a residual depthwise convolution over the values; returns the output
    [B, n, dim] and the first token's attention row [B, n] (mean over heads)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, num_landmarks: int = 256, pinv_iterations: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.dim_head, self.num_landmarks, self.pinv_iterations = heads, dim_head, num_landmarks, pinv_iterations
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        h, dh = self.heads, self.dim_head
        qkv = self.to_qkv(x).reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)  # [3, B, h, n, dh]
        q, k, v = qkv[0], qkv[1], qkv[2]
        keep = mask[:, None, :, None].to(x.dtype)
        q, k, v = q * keep * dh ** -0.5, k * keep, v * keep
        key_mask = mask[:, None, None, :]
        if n <= self.num_landmarks:  # every token its own landmark: exact attention (see the module docstring)
            attn = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~key_mask, -1e4), dim=-1)
            out, row = attn @ v, attn[:, :, 0]
        else:
            m = self.num_landmarks
            pad = (m - n % m) % m  # pad in front, as the reference does
            qp, kp = nn.functional.pad(q, (0, 0, pad, 0)), nn.functional.pad(k, (0, 0, pad, 0))
            maskp = nn.functional.pad(mask, (pad, 0), value=False)
            l = (n + pad) // m
            count = maskp.reshape(b, 1, m, l).sum(-1).to(x.dtype)  # real tokens per landmark
            q_l = qp.reshape(b, h, m, l, dh).sum(3) / count.clamp_min(1).unsqueeze(-1)
            k_l = kp.reshape(b, h, m, l, dh).sum(3) / count.clamp_min(1).unsqueeze(-1)
            lm = (count > 0).unsqueeze(-2)  # [B, 1, 1, m]
            a1 = torch.softmax((q @ k_l.transpose(-1, -2)).masked_fill(~lm, -1e4), dim=-1)
            a2 = torch.softmax((q_l @ k_l.transpose(-1, -2)).masked_fill(~lm, -1e4), dim=-1)
            a3 = torch.softmax((q_l @ k.transpose(-1, -2)).masked_fill(~key_mask, -1e4), dim=-1)
            left = a1 @ iterative_pinv(a2, self.pinv_iterations)
            out, row = left @ (a3 @ v), (left[:, :, 0:1] @ a3).squeeze(2)
        out = out + self.res_conv(v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * dh)), row.mean(dim=1)


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention: ``x + attn(LayerNorm(x))``."""

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=8, dim_head=dim // 8, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out, row = self.attn(self.norm(x), mask)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + conv7(x) + conv5(x) + conv3(x)`` (depthwise) on the square grid of
    instance tokens; the class token passes unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILBase):
    """TransMIL on one scale view (see the module docstring)."""

    permutation_invariant = False  # PPEG: the order of instances matters

    def __init__(self, in_features: int = 2048, num_scales: int = 3, num_clusters: int = 8, scale_mode: str = "select",
                 scale: int = 0, hidden: int = 512, dropout: float = 0.1, num_classes: int = 2) -> None:
        super().__init__(in_features, num_scales, num_clusters)
        self.scale_mode, self.scale = scale_mode, scale
        self.fc1 = nn.Sequential(nn.Linear(view_dim(in_features, num_scales, scale_mode), hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.layer1 = TransLayer(hidden, dropout)
        self.pos_layer = PPEG(hidden)
        self.layer2 = TransLayer(hidden, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    @torch.jit.ignore
    def published_recipe(self) -> Optional[recipe.TrainingRecipe]:
        """TransMIL's published optimiser (:data:`scripts.mil.recipe.TRANSMIL`)."""
        return recipe.TRANSMIL

    @torch.jit.export
    def forward_attention(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits [B, C] and the maps' weights: ``patch`` / ``instance`` [B, N] (the class token's attention in the
        second layer, renormalised over real slots), ``cluster`` [B, K], ``scale`` [B, N, S] (the view's)."""
        x, mask = self.prepare(x, mask)
        inst, imask = combine_scales(x, mask, self.scale_mode, self.scale, self.num_clusters)
        b, n = inst.shape[0], inst.shape[1]
        h = self.fc1(inst)
        side = int(math.ceil(math.sqrt(n)))
        extra = side * side - n
        h = torch.cat([h, h[:, :extra]], dim=1)  # square grid: repeat the first instances
        m = torch.cat([imask, imask[:, :extra]], dim=1)
        m = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), m], dim=1)
        h = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1) * m.unsqueeze(-1).to(h.dtype)
        h, _ = self.layer1(h, m)
        h = self.pos_layer(h * m.unsqueeze(-1).to(h.dtype), side)
        h, row = self.layer2(h, m)
        logits = self.fc2(self.norm(h)[:, 0])
        w = row[:, 1:].clamp_min(0.0) * m[:, 1:].to(h.dtype)
        w = w[:, :n].index_add(1, torch.arange(extra, device=x.device), w[:, n:])  # repeats back to their slots
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return logits, {"scale": view_scale_weights(self.scale_mode, self.scale, x), "instance": w, "patch": w,
                        "cluster": cluster_mass(w, self.num_clusters)}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, num_classes] of bags ``x`` [B, S, N, D] with optional ``mask`` [B, N]."""
        return self.forward_attention(x, mask)[0]
