"""Per-scale patch encoders built from MONAI networks (no torchvision).

``resnet50`` (2048-d, the paper's SimSiam backbone) is the default for real cohorts; ``resnet18`` (512-d)
and ``tiny`` (a 4-stage basic-block ResNet with a stride-4 stem, 128-d) serve CPU demos and tests. Weights come from a state
dict file (e.g. a SimSiam checkpoint or a foundation model's backbone) or, without one, from a seeded
random initialisation (tests and the untrained demo only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from monai.networks.nets import ResNet

from scripts.cache import tensor_dict_hash
from scripts.errors import BundleInputError

logger = logging.getLogger(__name__)

ARCHS = {
    "resnet50": dict(block="bottleneck", layers=[3, 4, 6, 3], block_inplanes=[64, 128, 256, 512]),
    "resnet18": dict(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512]),
    # CPU demo/test encoder: 4 basic blocks, stride-4 stem (about 10x cheaper than resnet18)
    "tiny": dict(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], conv1_t_stride=4),
}


def build_backbone(arch: str = "resnet50") -> torch.nn.Module:
    """A 2-D MONAI ResNet without its classifier: (B, 3, H, W) -> (B, D)."""
    if arch not in ARCHS:
        raise BundleInputError(None, f"unknown encoder architecture '{arch}'", f"choose one of {sorted(ARCHS)}")
    return ResNet(spatial_dims=2, n_input_channels=3, feed_forward=False, **ARCHS[arch])


def feature_dim(arch: str) -> int:
    spec = ARCHS[arch]
    return spec["block_inplanes"][-1] * (4 if spec["block"] == "bottleneck" else 1)


def load_state(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True``), unwrapping ``state_dict``/``model`` and a prefix."""
    path = Path(path)
    if not path.is_file():
        raise BundleInputError(path, "encoder weights not found", "run the pretrain stage or fix 'encoder_weights' in the config")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_encoder(arch: str = "resnet50", weights: str | Path | None = None, seed: int = 0, prefix: str = "") -> torch.nn.Module:
    """Backbone with weights from ``weights`` or a seeded random init; in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_backbone(arch)
    if weights:
        state = load_state(weights, prefix)
        check_state_matches(net, state, weights, hint="check 'encoder_arch' and 'encoder_weights_prefix' (e.g. 'backbone.' or 'encoder.')")
        net.load_state_dict(state, strict=False)
    return net.eval()


def check_state_matches(net: torch.nn.Module, state: dict, path: str | Path, hint: str) -> None:
    """Raise a :class:`BundleInputError` that lists missing, unexpected and mis-shaped keys."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or shapes:
        def head(xs):
            return f"{xs[:4]}{' ...' if len(xs) > 4 else ''} ({len(xs)})"

        raise BundleInputError(
            path,
            f"weights do not match the {type(net).__name__} network: missing {head(missing)}, "
            f"unexpected {head(unexpected)}, shape mismatches {head(shapes)}",
            hint,
        )


def encoder_signature(net: torch.nn.Module, arch: str) -> dict:
    """Provenance of an encoder: architecture and a hash of its weights (those of the backbone where the
    encoder carries its preprocessing: the same network hashes the same either way)."""
    if getattr(net, "includes_preprocessing", False):
        net = net.backbone
    return {"arch": arch, "weights_sha": tensor_dict_hash(net.state_dict())}


def build_scale_encoders(
    arch: str, num_scales: int, weights: list[str | None] | None = None, seed: int = 0, prefix: str = ""
) -> list[torch.nn.Module]:
    """One encoder per scale (the paper trains one SimSiam model per magnification)."""
    weights = list(weights) if weights else [None] * num_scales
    if not any(weights):
        logger.warning("encoders are randomly initialised (seed %d): fine for tests and the demo, not for real "
                       "data; use --encoder_weights pretrain or state-dict files", seed)
    if len(weights) != num_scales:
        raise BundleInputError(None, f"{len(weights)} encoder weight files for {num_scales} scales", "give one weights file per scale (or null)")
    return [build_encoder(arch, w, seed=seed + 1000 * s, prefix=prefix) for s, w in enumerate(weights)]
