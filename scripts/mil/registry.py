"""Every MIL model of the bundle by name (``mil_model``, ``eval_models``): the paper's Table 1 baselines and Table 3
CS-MIL variants, CS-MIL-joint and its ablations. One model per module: :mod:`scripts.mil.networks` (CSMIL),
:mod:`scripts.mil.fusion` (JointScaleMIL), :mod:`scripts.mil.attention_mil` (AttentionMIL), :mod:`scripts.mil.dsmil`
(DSMIL), :mod:`scripts.mil.abmil` (ABMIL), :mod:`scripts.mil.transmil` (TransMIL), :mod:`scripts.mil.clam` (CLAM-SB),
:mod:`scripts.mil.monai_mil` (MONAI's MILModel heads), all on :class:`scripts.mil.base.MILBase`.
"""

from __future__ import annotations

from torch import nn

from scripts.mil.abmil import ABMIL
from scripts.mil.attention_mil import AttentionMIL
from scripts.mil.clam import CLAMSB
from scripts.mil.dsmil import DSMIL
from scripts.mil.fusion import JointScaleMIL
from scripts.mil.monai_mil import MONAIMIL
from scripts.mil.networks import CSMIL
from scripts.mil.transmil import TransMIL

#: the paper's Table 1 / Table 3 models by name (constructor, keyword arguments)
MODELS: dict[str, tuple[type, dict]] = {
    "deepattnmisl_20x": (AttentionMIL, {"scale_mode": "select", "scale": 0}),
    "deepattnmisl_10x": (AttentionMIL, {"scale_mode": "select", "scale": 1}),
    "deepattnmisl_5x": (AttentionMIL, {"scale_mode": "select", "scale": 2}),
    "gated_attention_multiscale": (AttentionMIL, {"scale_mode": "instances", "pooling": "flat", "gated": True}),
    "deepattnmisl_multiscale": (AttentionMIL, {"scale_mode": "instances"}),
    "mdmil": (AttentionMIL, {"scale_mode": "sum"}),
    "dsmil": (DSMIL, {}),
    "csmil": (CSMIL, {}),
    "csmil_shared_tanh": (CSMIL, {"scale_activation": "tanh"}),
    "csmil_nonshared_relu": (CSMIL, {"share_scale_kernel": False}),
    "csmil_nonshared_tanh": (CSMIL, {"share_scale_kernel": False, "scale_activation": "tanh"}),
    "csmil_reference": (CSMIL, {"scale_softmax": False, "pooling": "flat"}),
    "csmil_flat": (CSMIL, {"pooling": "flat"}),
    "csmil_joint": (JointScaleMIL, {}),
    # ablations of csmil_joint (docs/evaluation.md): the paper's fusion with critical-instance pooling, and the
    # joint fusion with the paper's hierarchical attention pooling
    "ablation_paper_fusion": (JointScaleMIL, {"fusion": "paper"}),
    "ablation_attention_pooling": (JointScaleMIL, {"pooling": "hierarchical"}),
    # heads from the field (issue 30), each on the 20x scale alone and on the scales concatenated per location
    "abmil_20x": (ABMIL, {"scale_mode": "select", "scale": 0}),
    "abmil_concat": (ABMIL, {"scale_mode": "concat"}),
    "transmil_20x": (TransMIL, {"scale_mode": "select", "scale": 0}),
    "transmil_concat": (TransMIL, {"scale_mode": "concat"}),
    "clam_sb_20x": (CLAMSB, {"scale_mode": "select", "scale": 0}),
    "clam_sb_concat": (CLAMSB, {"scale_mode": "concat"}),
    "monai_att_20x": (MONAIMIL, {"mil_mode": "att", "scale_mode": "select", "scale": 0}),
    "monai_att_concat": (MONAIMIL, {"mil_mode": "att", "scale_mode": "concat"}),
    "monai_att_trans_20x": (MONAIMIL, {"mil_mode": "att_trans", "scale_mode": "select", "scale": 0}),
    "monai_att_trans_concat": (MONAIMIL, {"mil_mode": "att_trans", "scale_mode": "concat"}),
    "monai_att_trans_pyramid": (MONAIMIL, {"mil_mode": "att_trans_pyramid"}),
}


#: the heads from the field (ABMIL, TransMIL, CLAM-SB, MONAI MILModel), in registry order: the report's own table
FIELD_HEADS: tuple[str, ...] = tuple(n for n, (cls, _) in MODELS.items() if cls in (ABMIL, TransMIL, CLAMSB, MONAIMIL))


def build_model(name: str, in_features: int, num_scales: int = 3, num_clusters: int = 8, **overrides) -> nn.Module:
    """One of :data:`MODELS` by name; an override given as None (e.g. ``dropout`` from ``mil_dropout: null``) keeps the
    model's own default."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls, kw = MODELS[name]
    given = {k: v for k, v in overrides.items() if v is not None}
    return cls(in_features=in_features, num_scales=num_scales, num_clusters=num_clusters, **{**kw, **given})
