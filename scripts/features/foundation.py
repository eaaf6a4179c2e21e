"""Pathology foundation encoders by name: ``--encoder_arch uni`` (docs/encoders.md lists every entry).

Each :class:`Entry` holds what the model card says: the Hugging Face hub id, the checkpoint layout (timm, or
transformers' ViT / DINOv2, mapped onto timm's by :mod:`scripts.features.vit`), the architecture's
hyper-parameters, the output (class token, or class token + mean of patch tokens), the input size and mean/std,
the licence and whether the hub gates access. The network is :class:`scripts.features.vit.VisionTransformer`; in
front of it sits the same device input layer as an exported file's
(:class:`scripts.features.encoder_files.EncoderInput`: uint8 -> [0, 1] -> resize to the input size -> mean/std), so
extraction, inference, the Deploy export and the Deploy app compute the same features.

Weights (``encoder_weights``), nothing is shipped or redistributed:

- ``null``: the hub client's cache (``HF_HOME``; offline with ``HF_HUB_OFFLINE=1``), downloaded by it when online;
- a file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``): the checkpoint itself, for every scale;
- a JSON file ``{"uni": "/models/uni/pytorch_model.bin", ...}``: a site's map name -> file for offline clusters;
- ``random``: seeded random weights (speed measurements only).

A gated model without access, or one that is neither cached nor given, stops with one line that says how to get
it. ``huggingface_hub`` and ``safetensors`` are an optional extra (requirements-encoders.txt).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from scripts.errors import BundleInputError, first_line

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTRA = "pip install -r requirements-encoders.txt (huggingface_hub, safetensors)"


@dataclass(frozen=True)
class Entry:
    """One named encoder (values from its model card)."""

    hub_id: str
    arch: dict
    layout: str = "timm"  # timm | hf_vit | hf_dinov2 (transformers checkpoints, mapped onto timm's names)
    files: tuple = ("model.safetensors", "pytorch_model.bin")  # tried in this order in the hub repository
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    resize_mode: str = "bicubic"
    licence: str = ""
    gated: bool = False
    params_m: float = 0.0  # parameter count (millions) as the model card rounds it; the tests build on the meta device and compare
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        return int(self.arch["img_size"])

    @property
    def feature_dim(self) -> int:
        return int(self.arch["embed_dim"]) * (2 if self.arch.get("output") == "cls+mean" else 1)


def _vit(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, **kw: Any) -> dict:
    return dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, **kw)


_SWIGLU = dict(glu=True, init_values=1e-5)
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
HIBOU_MEAN, HIBOU_STD = (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)

REGISTRY: dict[str, Entry] = {
    "uni": Entry("MahmoodLab/UNI", _vit(224, 16, 1024, 24, 16, init_values=1e-5), files=("pytorch_model.bin",),
                 licence="CC-BY-NC-ND-4.0", gated=True, params_m=303, note="ViT-L/16, class token"),
    "uni2-h": Entry("MahmoodLab/UNI2-h", _vit(224, 14, 1536, 24, 24, 2.66667 * 2, reg_tokens=8, no_embed_class=True, **_SWIGLU),
                    files=("pytorch_model.bin",), licence="CC-BY-NC-ND-4.0", gated=True, params_m=681,
                    note="ViT-H/14 (SwiGLU, 8 registers), class token"),
    "virchow": Entry("paige-ai/Virchow", _vit(224, 14, 1280, 32, 16, 5.3375, output="cls+mean", **_SWIGLU),
                     licence="Apache-2.0", gated=True, params_m=632, note="ViT-H/14 (SwiGLU), class token + mean patch token"),
    "virchow2": Entry("paige-ai/Virchow2", _vit(224, 14, 1280, 32, 16, 5.3375, reg_tokens=4, output="cls+mean", **_SWIGLU),
                      licence="CC-BY-NC-ND-4.0", gated=True, params_m=632,
                      note="ViT-H/14 (SwiGLU, 4 registers), class token + mean patch token"),
    "h-optimus-0": Entry("bioptimus/H-optimus-0", _vit(224, 14, 1536, 40, 24, 5.33334, reg_tokens=4, no_embed_class=True, **_SWIGLU),
                         mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, licence="Apache-2.0", gated=True, params_m=1134,
                         note="ViT-g/14 (SwiGLU, 4 registers), class token"),
    "h-optimus-1": Entry("bioptimus/H-optimus-1", _vit(224, 14, 1536, 40, 24, 5.33334, reg_tokens=4, no_embed_class=True, **_SWIGLU),
                         mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, licence="non-commercial (model card)", gated=True, params_m=1134,
                         note="ViT-g/14 (SwiGLU, 4 registers), class token"),
    "prov-gigapath": Entry("prov-gigapath/prov-gigapath", _vit(224, 16, 1536, 40, 24, 5.33334, **_SWIGLU), files=("pytorch_model.bin",),
                           licence="Apache-2.0", gated=True, params_m=1134, note="tile encoder, ViT-g/16 (SwiGLU), class token"),
    "phikon": Entry("owkin/phikon", _vit(224, 16, 768, 12, 12, norm_eps=1e-12), layout="hf_vit",
                    licence="Owkin non-commercial", params_m=86, note="ViT-B/16 (transformers ViTModel), class token"),
    "phikon-v2": Entry("owkin/phikon-v2", _vit(224, 16, 1024, 24, 16, init_values=1e-5, no_embed_class=True), layout="hf_dinov2",
                       licence="Owkin non-commercial", params_m=303, note="ViT-L/16 (transformers Dinov2Model), class token"),
    "hibou-b": Entry("histai/hibou-b", _vit(224, 14, 768, 12, 12, init_values=1e-5, reg_tokens=4, no_embed_class=True), layout="hf_dinov2",
                     mean=HIBOU_MEAN, std=HIBOU_STD, licence="Apache-2.0", params_m=86, note="ViT-B/14 (DINOv2, 4 registers), class token"),
    "hibou-l": Entry("histai/hibou-L", _vit(224, 14, 1024, 24, 16, init_values=1e-5, reg_tokens=4, no_embed_class=True), layout="hf_dinov2",
                     mean=HIBOU_MEAN, std=HIBOU_STD, licence="Apache-2.0", params_m=304, note="ViT-L/14 (DINOv2, 4 registers), class token"),
    # the tests' entry: a two-block ViT with every feature above (SwiGLU, LayerScale, a register, class + mean
    # output); no such repository exists on the hub: tests write it into a cache folder, or pass a file
    "vit-test": Entry("csmil-bundle/vit-test", _vit(224, 32, 48, 2, 3, 2.0, reg_tokens=1, no_embed_class=True, output="cls+mean", **_SWIGLU),
                      files=("model.safetensors",), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), licence="test only", params_m=0.2,
                      note="tests and CPU checks (random weights written by the tests)"),
}


def is_named_encoder(arch: Any) -> bool:
    """Whether ``encoder_arch`` is a name of :data:`REGISTRY`."""
    return isinstance(arch, str) and arch in REGISTRY


def entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise BundleInputError(None, f"unknown encoder name '{name}'", f"choose one of {sorted(REGISTRY)} (docs/encoders.md)")
    return REGISTRY[name]


def build_network(name: str) -> torch.nn.Module:
    """The entry's :class:`~scripts.features.vit.VisionTransformer` with fresh weights (on the current default device,
    e.g. inside ``with torch.device("meta")``)."""
    from scripts.features.vit import VisionTransformer

    return VisionTransformer(**entry(name).arch)


def weights_file(name: str, weights: str | Path | None) -> Path | None:
    """The checkpoint file of ``name``: ``weights`` (a file, or a JSON map name -> file), or the hub cache (downloaded
    when online); ``None`` for ``"random"``."""
    e = entry(name)
    if weights is not None and str(weights) == "random":
        return None
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise BundleInputError(p, f"weights file for encoder '{name}' not found", "pass an existing checkpoint or JSON map as --encoder_weights")
        if p.suffix == ".json":
            try:
                mapping = json.loads(p.read_text())
            except json.JSONDecodeError as err:
                raise BundleInputError(p, f"is not valid JSON ({err.msg}, line {err.lineno})", 'write {"<name>": "/path/to/weights", ...}') from None
            if not isinstance(mapping, dict) or name not in mapping:
                raise BundleInputError(p, f"has no entry for encoder '{name}'", f'add "{name}": "/path/to/its/weights file" to the map')
            target = Path(mapping[name])
            target = target if target.is_absolute() else p.parent / target
            if not target.is_file():
                raise BundleInputError(target, f"weights file for encoder '{name}' (from {p.name}) not found", "fix the path in the map")
            return target
        return p
    return _from_hub(name, e)


def _from_hub(name: str, e: Entry) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise BundleInputError(None, f"encoder '{name}' is loaded from the Hugging Face hub cache, and huggingface_hub is not installed",
                               f"{EXTRA}, or pass the checkpoint as --encoder_weights FILE") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    cache, page = hub_cache(), f"https://huggingface.co/{e.hub_id}"
    fetch = (f"download it where there is network (hf download {e.hub_id}), copy that Hugging Face cache here (HF_HOME), "
             "or pass the file as --encoder_weights FILE or a JSON map name -> file")
    missing: list[str] = []
    for filename in e.files:
        try:  # cache, offline mode and endpoint read now (the hub client reads its environment once, at import)
            return Path(hf_hub_download(e.hub_id, filename, cache_dir=cache, local_files_only=offline,
                                        endpoint=os.environ.get("HF_ENDPOINT") or None))
        except GatedRepoError:
            raise BundleInputError(page, f"encoder '{name}' is gated on the Hugging Face hub and this account has no access",
                                   f"request access at {page}, then log in (hf auth login, or HF_TOKEN)") from None
        except RepositoryNotFoundError:
            raise BundleInputError(page, f"encoder '{name}': repository {e.hub_id} not found on the Hugging Face hub (or not visible "
                                         "to this account)", f"log in with an account that can see it, or {fetch}") from None
        except (EntryNotFoundError, LocalEntryNotFoundError) as err:
            missing.append(f"{filename}: {type(err).__name__}")
            continue
        except Exception as err:  # noqa: BLE001 - network errors etc.: one line
            raise BundleInputError(page, f"encoder '{name}' could not be fetched ({type(err).__name__}: {first_line(err, 80)})", fetch) from None
    state = "offline (HF_HUB_OFFLINE=1) and " if offline else ""
    raise BundleInputError(cache, f"encoder '{name}' ({e.hub_id}) is {state}not in this Hugging Face cache ({'; '.join(missing)})", fetch)


def hub_cache() -> Path:
    """The hub client's cache folder as its environment says now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, or a torch file read with ``weights_only=True`` (unwrapped)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise BundleInputError(path, "is a safetensors file and safetensors is not installed", EXTRA) from None
        return load_file(str(path))
    from scripts.features.encoders import load_state

    return load_state(path)


def load_weights(name: str, net: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into the entry's network (mapped from transformers' layout where the entry says so)."""
    from scripts.features.encoders import check_state_matches
    from scripts.features.vit import CONVERTERS

    e = entry(name)
    state = read_checkpoint(path)
    for prefix in ("module.", "model.", "vit.", "dinov2.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    convert = CONVERTERS[e.layout]
    if convert is not None:
        try:
            state = convert(state)
        except KeyError as err:
            raise BundleInputError(path, f"is not a transformers {e.layout[3:]} checkpoint of '{name}' (no {err})",
                                   f"pass the checkpoint of {e.hub_id}") from None
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "pooler.", "mask_token", "embeddings.mask_token"))}
    check_state_matches(net, state, path, hint=f"pass the checkpoint of {e.hub_id} ({e.note})")
    unexpected = sorted(set(state) - set(net.state_dict()))
    if unexpected:
        raise BundleInputError(path, f"has tensors the '{name}' network does not have: {unexpected[:4]} ({len(unexpected)})",
                               f"pass the checkpoint of {e.hub_id}")
    net.load_state_dict(state)


def build_named_encoder(name: str, weights: str | Path | None = None, seed: int = 0) -> torch.nn.Module:
    """The named encoder with its input layer (uint8 patches in, ``[B, feature_dim]`` out), in eval mode; ``encoder_name``,
    ``weights_file`` set for provenance."""
    from scripts.features.device_preprocessing import PreprocessedEncoder
    from scripts.features.encoder_files import EncoderInput

    e = entry(name)
    path = weights_file(name, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(name)
    if path is None:
        logger.warning("encoder '%s' has random weights (--encoder_weights random): for speed measurements only", name)
    else:
        load_weights(name, net, path)
    enc = PreprocessedEncoder(EncoderInput(e.input_size, e.resize_mode, True, e.mean, e.std), net)
    enc.encoder_name = name
    enc.weights_file = str(path) if path else None
    logger.info("encoder %s (%s): input %d px, %d-d features, weights %s", name, e.hub_id, e.input_size, e.feature_dim, path or "random")
    return enc.eval()


def build_named_encoders(name: str, num_scales: int, weights: Any = None, seed: int = 0) -> list[torch.nn.Module]:
    """One encoder per scale; one network shared by the scales that use the same weights (one copy in memory).
    ``weights`` is null, ``"random"``, a file / JSON map, or a list with one of those per scale."""
    per_scale: Sequence = list(weights) if isinstance(weights, (list, tuple)) else [weights] * num_scales
    if len(per_scale) != num_scales:
        raise BundleInputError(str(weights), f"{len(per_scale)} encoder weight entries for {num_scales} scales",
                               "give one file (or null), or one per scale")
    built: dict[str, torch.nn.Module] = {}
    for w in per_scale:
        if str(w) not in built:
            built[str(w)] = build_named_encoder(name, w, seed=seed)
    return [built[str(w)] for w in per_scale]


def registry_table() -> str:
    """The registry as a markdown table (docs/encoders.md)."""
    rows = ["| `encoder_arch` | hub id | network | features | input | mean / std | licence | gated |", "|---|---|---|---|---|---|---|---|"]
    for name, e in REGISTRY.items():
        ms = "ImageNet" if (e.mean, e.std) == (IMAGENET_MEAN, IMAGENET_STD) else f"{list(e.mean)} / {list(e.std)}"
        rows.append(f"| `{name}` | `{e.hub_id}` | {e.note} ({e.layout}, {e.params_m:g} M) | {e.feature_dim} | {e.input_size} | {ms} | "
                    f"{e.licence} | {'yes' if e.gated else 'no'} |")
    return "\n".join(rows)
