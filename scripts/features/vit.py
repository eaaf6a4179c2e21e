"""A Vision Transformer with timm's state-dict layout, in plain torch (TorchScript-able).

The pathology foundation encoders of :mod:`scripts.features.foundation` (UNI, UNI2-h, Virchow, Virchow2,
H-optimus, Prov-GigaPath, ...) publish timm ``VisionTransformer`` checkpoints. timm itself is not used: it
hard-requires torchvision, whose PyPI wheels do not import beside the CPU build of torch this bundle installs
(``operator torchvision::nms does not exist``), and the core install stays lean. This module builds the same
network from the same hyper-parameters, with the same parameter names, so a timm checkpoint loads unchanged:

    patch_embed.proj  cls_token  reg_token  pos_embed  blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
    mlp.fc1, mlp.fc2, ls2.gamma}  norm

Covered: LayerScale (``init_values``), register tokens (``reg_tokens``), position embeddings over the patches
only (``no_embed_class``) or over the prefix tokens too, the GELU MLP and timm's packed SwiGLU
(``SwiGLUPacked``: ``fc1`` -> halves ``a, b`` -> ``silu(a) * b`` -> ``fc2``). The input size is fixed (the encoder's
input layer resizes patches to it), so no position-embedding resampling happens at run time.
:func:`from_hf_vit` / :func:`from_hf_dinov2` map Hugging Face transformers' ``ViTModel`` / ``Dinov2Model``
checkpoints onto this layout (Phikon, Phikon-v2, Hibou). Equality with timm and transformers on the same weights
is checked by ``tools/encoder_parity.py`` (docs/encoders.md).
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; ``glu``: timm's packed SwiGLU, ``fc2(silu(a) * b)`` with ``a, b`` the halves of ``fc1(x)``."""

    def __init__(self, dim: int, hidden: int, glu: bool = False) -> None:
        super().__init__()
        self.glu = bool(glu)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if glu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.glu:
            a, b = x.chunk(2, dim=-1)
            x = F.silu(a) * b
        else:
            x = F.gelu(x)
        return self.fc2(x)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, glu: bool, init_values: Optional[float], eps: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden, glu)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """(B, 3, img_size, img_size) -> (B, D) or (B, 2D): the class token (``output="cls"``) or the class token
    concatenated with the mean of the patch tokens (``"cls+mean"``, as Virchow's model card defines the
    embedding), after the final norm. Register tokens are never part of the output."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, glu: bool = False, init_values: Optional[float] = None, reg_tokens: int = 0,
                 no_embed_class: bool = False, norm_eps: float = 1e-6, qkv_bias: bool = True, output: str = "cls") -> None:
        super().__init__()
        if output not in ("cls", "cls+mean"):
            raise ValueError(f"output {output!r} is not 'cls' or 'cls+mean'")
        self.img_size = int(img_size)
        self.num_reg = int(reg_tokens)
        self.no_embed_class = bool(no_embed_class)
        self.mean_tokens = output == "cls+mean"
        self.embed_dim = int(embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, max(self.num_reg, 1), embed_dim)) if self.num_reg else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + (0 if no_embed_class else 1 + self.num_reg), embed_dim) * 0.02)
        hidden = int(embed_dim * mlp_ratio)  # timm: int(embed_dim * mlp_ratio), halved after fc1 by the packed SwiGLU
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, hidden, glu, init_values, norm_eps, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * (2 if self.mean_tokens else 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: [class, registers..., patches...]."""
        x = self.patch_embed(x)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        reg = self.reg_token
        if reg is not None:
            prefix.append(reg.expand(b, -1, -1))
        if self.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.forward_features(x)
        if self.mean_tokens:
            return torch.cat([t[:, 0], t[:, 1 + self.num_reg:].mean(dim=1)], dim=-1)
        return t[:, 0]


def legacy_names(state: Dict[str, torch.Tensor], vit: bool) -> Dict[str, torch.Tensor]:
    """transformers 5 names (``layers.<i>`` / ``attention.q_proj`` / ViT's ``mlp.fc1``) -> the names of the published
    (transformers 4) checkpoints, which the converters read; published checkpoints pass unchanged."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", k)
        for new, old in (("q_proj", "attention.query"), ("k_proj", "attention.key"), ("v_proj", "attention.value"), ("o_proj", "output.dense")):
            k = k.replace(f".attention.{new}.", f".attention.{old}.")
        if vit:
            k = k.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")
        out[k] = v
    return out


def _qkv(state: Dict[str, torch.Tensor], pre: str, kind: str) -> torch.Tensor:
    return torch.cat([state[f"{pre}.{n}.{kind}"] for n in ("query", "key", "value")], dim=0)


def _blocks(state: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor], names: Dict[str, str], first: str) -> None:
    """Map the transformer layers ``encoder.layer.<i>`` (while ``<i>.<first>.weight`` exists) into ``out``: the
    attention as ``attn.qkv`` / ``attn.proj``, and ``names`` (our name -> theirs) for the norms and the MLP."""
    i = 0
    while f"encoder.layer.{i}.{first}.weight" in state:
        p, q = f"encoder.layer.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{q}.attn.qkv.{kind}"] = _qkv(state, f"{p}.attention.attention", kind)
            out[f"{q}.attn.proj.{kind}"] = state[f"{p}.attention.output.dense.{kind}"]
            for ours, theirs in names.items():
                out[f"{q}.{ours}.{kind}"] = state[f"{p}.{theirs}.{kind}"]
        if f"{p}.layer_scale1.lambda1" in state:
            out[f"{q}.ls1.gamma"] = state[f"{p}.layer_scale1.lambda1"]
            out[f"{q}.ls2.gamma"] = state[f"{p}.layer_scale2.lambda1"]
        i += 1


def _ends(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The patch embedding and the final norm (the same names in both layouts)."""
    return {"patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}


def from_hf_vit(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A transformers ``ViTModel`` state dict in this module's layout (pooler dropped)."""
    state = legacy_names(state, vit=True)
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"], **_ends(state)}
    _blocks(state, out, {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                         "mlp.fc2": "output.dense"}, "layernorm_before")
    return out


def from_hf_dinov2(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) state dict in this module's layout.

    DINOv2 adds its position embedding to the class and patch tokens and inserts the registers after it; here the
    class token's position embedding is folded into ``cls_token`` and the rest is ``pos_embed`` over the patches
    (``no_embed_class=True``): the same sums. The SwiGLU's ``weights_in`` / ``weights_out`` are ``fc1`` / ``fc2``."""
    state = legacy_names(state, vit=False)
    pos = state["embeddings.position_embeddings"]
    out = {"cls_token": state["embeddings.cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:], **_ends(state)}
    if "embeddings.register_tokens" in state:
        out["reg_token"] = state["embeddings.register_tokens"]
    glu = "encoder.layer.0.mlp.weights_in.weight" in state
    _blocks(state, out, {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.weights_in" if glu else "mlp.fc1",
                         "mlp.fc2": "mlp.weights_out" if glu else "mlp.fc2"}, "norm1")
    return out


CONVERTERS = {"timm": None, "hf_vit": from_hf_vit, "hf_dinov2": from_hf_dinov2}
