"""Check that the registry's timm-layout encoders equal timm's own networks on the same weights.

    pip install --no-deps timm        # timm's torchvision requirement cannot be met beside the CPU torch here
    python tools/encoder_parity.py [--depth 2]

timm hard-requires torchvision at import, for data transforms and a frozen batch norm its ViT does not use; the
PyPI torchvision wheels do not import beside the CPU build of torch (``operator torchvision::nms does not exist``).
Where torchvision does not import, this script puts a stand-in for those import names on ``sys.path`` (in a
temporary folder, for this process only) so that timm's ``VisionTransformer`` code can be built and run; on a
machine with a working torchvision nothing is replaced. Per entry it builds timm's network with the model card's
``timm.create_model`` arguments at ``--depth`` blocks, loads timm's random weights into
:class:`scripts.features.vit.VisionTransformer` (strict: every name and shape must match) and compares the
embeddings the model card defines. The transformers-layout entries are checked by tests/test_foundation_encoders.py
(transformers installs beside the CPU torch). Results are recorded in docs/encoders.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHIM = {
    "torchvision/__init__.py": "__version__ = '0+stand-in'\n",
    "torchvision/ops/__init__.py": "",
    "torchvision/ops/misc.py": "import torch\nclass FrozenBatchNorm2d(torch.nn.Module):\n    pass\n",
    "torchvision/datasets.py": "def __getattr__(name):\n    return type(name, (), {})\n",
    "torchvision/transforms/__init__.py": ("class InterpolationMode:\n    NEAREST, BILINEAR, BICUBIC, BOX, HAMMING, LANCZOS = "
                                           "'nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'\n"
                                           "def __getattr__(name):\n    return type(name, (), {})\n"),
    "torchvision/transforms/functional.py": ("from torchvision.transforms import InterpolationMode\n"
                                             "def __getattr__(name):\n    return lambda *a, **k: None\n"),
}


def import_timm():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or the wheel does not match this torch
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        folder = Path(tempfile.mkdtemp(prefix="tv-stand-in-"))
        for rel, text in SHIM.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        sys.path.insert(0, str(folder))
    import timm

    return timm


def timm_models(timm, depth: int) -> dict:
    """Per registry name: timm's network as the model card builds it (at ``depth`` blocks) and its embedding."""
    from timm.layers import SwiGLUPacked

    swiglu = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    d = dict(depth=depth, num_classes=0)
    cls = lambda out: out  # noqa: E731 - pooled class token (global_pool 'token')
    virchow = lambda reg: (lambda out: torch.cat([out[:, 0], out[:, 1 + reg:].mean(1)], dim=-1))  # noqa: E731
    return {
        "uni": (timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True, **d), cls),
        "uni2-h": (timm.create_model("vit_giant_patch14_224", img_size=224, patch_size=14, num_heads=24, init_values=1e-5, embed_dim=1536,
                                     mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **swiglu, **d), cls),
        "virchow": (timm.create_model("vit_huge_patch14_224", img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="",
                                      dynamic_img_size=True, **swiglu, **d), virchow(0)),
        "virchow2": (timm.create_model("vit_huge_patch14_224", img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", reg_tokens=4,
                                       dynamic_img_size=True, **swiglu, **d), virchow(4)),
        "h-optimus-0": (timm.create_model("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5, dynamic_img_size=False, **d), cls),
        "h-optimus-1": (timm.create_model("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5, dynamic_img_size=False, **d), cls),
        "prov-gigapath": (timm.create_model("vit_giant_patch14_dinov2", img_size=224, patch_size=16, init_values=1e-5, mlp_ratio=5.33334, **d), cls),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=2, help="transformer blocks built (the full depths only cost memory and time)")
    args = ap.parse_args()
    timm = import_timm()
    from scripts.features.foundation import REGISTRY
    from scripts.features.vit import VisionTransformer

    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    worst = 0.0
    for name, (ref, embed) in timm_models(timm, args.depth).items():
        ref.eval()
        with torch.no_grad():
            for p in ref.parameters():  # LayerScale starts at 1e-5: give every parameter a visible value
                p.copy_(torch.randn_like(p) * 0.05)
        ours = VisionTransformer(**{**REGISTRY[name].arch, "depth": args.depth}).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            a, b = ours(x), embed(ref(x))
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        print(f"{name:14s} timm {timm.__version__}: {tuple(b.shape)} max |ours - timm| = {diff:.2e}")
    print(f"worst {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
