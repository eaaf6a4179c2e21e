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
    from scripts.features.encoder_files import is_encoder_file
    from scripts.features.foundation import is_named_encoder

    if is_named_encoder(arch):
        raise BundleInputError(None, f"SimSiam pretraining builds a built-in ResNet, not the foundation encoder '{arch}'",
                               f"use '{arch}' as it is (--encoder_weights null: the hub cache, or a file), or pretrain one of {sorted(ARCHS)}")
    if arch not in ARCHS and is_encoder_file(arch):
        raise BundleInputError(arch, "SimSiam pretraining builds a built-in architecture, not an exported encoder file",
                               f"pretrain one of {sorted(ARCHS)} (optionally from --pretrain_init_weights) or use the file with "
                               "--encoder_weights null")
    if arch not in ARCHS:
        raise BundleInputError(None, f"unknown encoder architecture '{arch}'", f"choose one of {sorted(ARCHS)}")
    return ResNet(spatial_dims=2, n_input_channels=3, feed_forward=False, **ARCHS[arch])


def feature_dim(arch: str | list, patch_size: int = 256) -> int:
    """Feature size D of ``encoder_arch`` (an exported file: found by a probe forward)."""
    from scripts.features.encoder_files import encoder_spec, is_encoder_file
    from scripts.features.foundation import REGISTRY, is_named_encoder

    if is_named_encoder(arch):
        return REGISTRY[arch].feature_dim
    if is_encoder_file(arch):
        dims = {encoder_spec(p, patch_size).feature_dim for p in (arch if isinstance(arch, (list, tuple)) else [arch])}
        if len(dims) > 1:
            raise BundleInputError(str(arch), f"the per-scale encoder files give different feature sizes {sorted(dims)}",
                                   "use encoders with one feature size at every scale (the MIL model takes [N, S, D])")
        return dims.pop()
    if arch not in ARCHS:
        raise BundleInputError(None, f"unknown encoder architecture '{arch}'",
                               f"choose one of {sorted(ARCHS)}, a foundation encoder ({', '.join(sorted(REGISTRY))}) or pass an "
                               "exported encoder file (docs/encoders.md)")
    spec = ARCHS[arch]
    return spec["block_inplanes"][-1] * (4 if spec["block"] == "bottleneck" else 1)


def load_state(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True``), unwrapping ``state_dict``/``model`` and a prefix; from an
    exported network (TorchScript / ``.pt2``), its parameters and buffers."""
    path = Path(path)
    if not path.is_file():
        raise BundleInputError(path, "encoder weights not found", "run the pretrain stage or fix 'encoder_weights' in the config")
    if path.suffix in (".ts", ".jit", ".torchscript", ".pt2"):  # an exported network: its parameters and buffers
        from scripts.features.encoder_files import load_module

        module = load_module(path)
        state = dict(getattr(module, "program", module).state_dict())
    else:
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
    file_sha = getattr(net, "file_sha256", None)
    if file_sha:  # an exported encoder file: its bytes and the input preprocessing it was given
        from scripts.features.encoder_files import input_settings

        return {"arch": "file:" + str(getattr(net, "file_name", "")), "weights_sha": str(file_sha), "input": input_settings(net.preprocess)}
    if getattr(net, "encoder_name", None):  # a named foundation encoder: its weights and its input layer
        from scripts.features.encoder_files import input_settings

        if not getattr(net, "weights_sha", None):  # hashed once per network (a ViT-g has 4.5 GB of weights)
            net.weights_sha = tensor_dict_hash(net.backbone.state_dict())
        return {"arch": str(net.encoder_name), "weights_sha": net.weights_sha, "input": input_settings(net.preprocess)}
    if getattr(net, "includes_preprocessing", False):
        net = net.backbone
    return {"arch": arch, "weights_sha": tensor_dict_hash(net.state_dict())}


def build_scale_encoders(
    arch: str | list, num_scales: int, weights: list[str | None] | None = None, seed: int = 0, prefix: str = "",
    patch_size: int = 256, mean: list[float] | None = None, std: list[float] | None = None,
) -> list[torch.nn.Module]:
    """One encoder per scale (the paper trains one SimSiam model per magnification). ``arch`` may be an exported
    encoder file (shared by the scales) or a list with one per scale (:mod:`scripts.features.encoder_files`;
    ``patch_size``, ``mean`` and ``std`` are the defaults of its preprocessing)."""
    from scripts.features.encoder_files import build_file_encoder, is_encoder_file
    from scripts.features.foundation import build_named_encoders, is_named_encoder

    if is_named_encoder(arch):  # a foundation encoder by name (scripts/features/foundation.py)
        return build_named_encoders(arch, num_scales, weights, seed=seed)
    if is_encoder_file(arch):
        paths = list(arch) if isinstance(arch, (list, tuple)) else [arch] * num_scales
        if len(paths) != num_scales:
            raise BundleInputError(str(arch), f"{len(paths)} encoder files for {num_scales} scales", "give one file, or one per scale")
        if weights and any(weights):
            raise BundleInputError(str(weights), "an exported encoder file carries its own weights",
                                   "leave --encoder_weights null with an encoder file (or export the trained network again)")
        kw = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        built: dict[str, torch.nn.Module] = {}  # a file shared by the scales is loaded once (one copy in memory)
        for p in paths:
            if str(p) not in built:
                built[str(p)] = build_file_encoder(p, patch_size, **kw)
        return [built[str(p)] for p in paths]
    weights = list(weights) if weights else [None] * num_scales
    if not any(weights):
        logger.warning("encoders are randomly initialised (seed %d): fine for tests and the demo, not for real "
                       "data; use --encoder_weights pretrain or state-dict files", seed)
    if len(weights) != num_scales:
        raise BundleInputError(None, f"{len(weights)} encoder weight files for {num_scales} scales", "give one weights file per scale (or null)")
    return [build_encoder(arch, w, seed=seed + 1000 * s, prefix=prefix) for s, w in enumerate(weights)]
