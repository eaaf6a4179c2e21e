"""Slide predictions (mean probability over random bags, the paper's test protocol) and attention of every
patch at every scale (one pass over all of a slide's patches, grouped by cluster). Writing the maps and
tables of a prediction is :mod:`scripts.inference.outputs`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from scripts.errors import BundleInputError
from scripts.features.encoders import check_state_matches
from scripts.features.store import FeatureEntry
from scripts.checkpoint import contract as contracts
from scripts.data.bags import gather_bag, slide_bags

logger = logging.getLogger(__name__)


def load_network(network: torch.nn.Module, ckpt_path: str | Path, device: str | torch.device = "cpu",
                 contract: Mapping[str, Any] | None = None, state: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Load a MIL checkpoint (``weights_only=True``) into ``network``; mismatches are listed. With ``contract``
    (the command's settings, :func:`scripts.checkpoint.contract.make_contract`), settings that differ from those the
    checkpoint was trained with are refused first; the checkpoint's contract is kept as ``network.csmil_contract``.
    ``state``: the file's state dict when the caller has read it already (it is not read again)."""
    ckpt_path = Path(ckpt_path)
    state = contracts.read_checkpoint(ckpt_path) if state is None else state
    stored = contracts.read(state)
    if contract is not None:
        contracts.check_settings(stored, contract, ckpt_path)
    check_state_matches(network, state, ckpt_path, "use the MIL model (--mil_model, e.g. csmil for a checkpoint of the "
                        "paper's CS-MIL) and encoder (hence in_features) the checkpoint was trained with")
    network.load_state_dict(state)
    network.csmil_contract = stored
    return network.to(device).eval()


def full_bag(clusters: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """All patches in one bag, cluster-major with ``max cluster size`` slots per cluster: (idx, mask)."""
    counts = np.bincount(clusters, minlength=num_clusters)
    m = max(1, int(counts.max()))
    idx = np.full(num_clusters * m, -1, np.int64)
    for k in range(num_clusters):
        members = np.flatnonzero(clusters == k)
        idx[k * m : k * m + len(members)] = members
    return idx, idx >= 0


@dataclass
class SlidePrediction:
    slide_id: str
    probability: float  # P(class 1) (two classes); the predicted class's probability (K > 2); the risk (survival)
    attention: np.ndarray  # [N, S] raw per-patch, per-scale attention (patch share x scale weight)
    scale_weights: np.ndarray  # [N, S]
    seconds: float
    probabilities: np.ndarray | None = None  # [C] mean class (survival: time-bin) probabilities over the bags
    map_class: int | None = None  # the class whose instance weights the maps show (None: the model's own weights)


@torch.inference_mode()
def bag_probability(
    network: torch.nn.Module, entry: FeatureEntry, num_clusters: int, per_cluster: int, num_bags: int = 100,
    replacement: bool = False, seed: int = 0, device: str | torch.device = "cpu", chunk: int = 25,
) -> float:
    """Mean probability of class 1 over the slide's ``num_bags`` fixed bags (:func:`scripts.data.bags.slide_bags`,
    the paper's test protocol, the same bags as validation); bags go through the network ``chunk`` at a time."""
    return float(bag_probabilities(network, entry, num_clusters, per_cluster, num_bags, replacement, seed, device, chunk)[:, 1]
                 .contiguous().mean())


@torch.inference_mode()
def bag_probabilities(
    network: torch.nn.Module, entry: FeatureEntry, num_clusters: int, per_cluster: int, num_bags: int = 100,
    replacement: bool = False, seed: int = 0, device: str | torch.device = "cpu", chunk: int = 25,
) -> torch.Tensor:
    """Class probabilities [R, C] of the slide's ``num_bags`` fixed bags (see :func:`bag_probability`)."""
    feats, clusters = entry.features(), entry.clusters()
    if clusters is None:
        raise BundleInputError(entry.path, "feature entry has no clusters", "run the cluster stage")
    idx, mask = slide_bags(clusters, entry.slide_id, num_clusters, per_cluster, num_bags, replacement, seed)
    probs = []
    for start in range(0, num_bags, chunk):
        x = torch.stack([gather_bag(feats, i) for i in idx[start:start + chunk]]).to(device)
        m = torch.from_numpy(mask[start:start + chunk]).to(device)
        probs.append(torch.softmax(network(x, m).float(), -1).cpu())
    return torch.cat(probs)


def mean_probabilities(network: torch.nn.Module, entry: FeatureEntry, num_clusters: int, per_cluster: int, num_bags: int = 100,
                       replacement: bool = False, seed: int = 0, device: str | torch.device = "cpu") -> list[float]:
    """Mean class (survival: time-bin) probabilities of the slide over its fixed bags, [C] as a list."""
    return bag_probabilities(network, entry, num_clusters, per_cluster, num_bags, replacement, seed, device).mean(0).tolist()


@torch.inference_mode()
def patch_attention(
    network: torch.nn.Module, entry: FeatureEntry, num_clusters: int, device: str | torch.device = "cpu",
    map_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over all of a slide's patches (one bag, grouped by cluster): per-patch, per-scale attention
    [N, S] (the patch's share x its scale weight) and the scale weights [N, S]. ``map_class``: the class whose
    weights to show where the model has per-class weights (``patch_class`` / ``scale_class``: the critical-instance
    models); attention shared by the classes is the same for every class."""
    feats, clusters = entry.features(), entry.clusters()
    idx, mask = full_bag(clusters, num_clusters)
    x = gather_bag(feats, idx)[None].to(device)
    _, att = network.forward_attention(x, torch.from_numpy(mask)[None].to(device))
    patch_w, scale_w = att["patch"], att["scale"]
    if map_class is not None and "patch_class" in att:
        patch_w = att["patch_class"][..., map_class]
    if map_class is not None and "scale_class" in att:
        scale_w = att["scale_class"][..., map_class]
    valid = idx[mask]
    n, s = len(feats), feats.shape[1]
    scale = np.zeros((n, s), np.float32)
    patch = np.zeros(n, np.float32)
    scale[valid] = scale_w[0][torch.from_numpy(mask)].float().cpu().numpy()
    patch[valid] = patch_w[0][torch.from_numpy(mask)].float().cpu().numpy()
    return patch[:, None] * scale, scale


def predict_entry(
    network: torch.nn.Module, entry: FeatureEntry, num_clusters: int, per_cluster: int, num_bags: int = 100,
    replacement: bool = False, seed: int = 0, device: str | torch.device = "cpu", chunk: int = 25,
    task: str = "classification", map_class: int | None = None,
) -> SlidePrediction:
    """Mean probability of class 1 over ``num_bags`` seeded random bags, and attention of every patch. With more
    than two classes: every class's mean probability, maps of the predicted class (or ``map_class``); survival: the
    risk (:func:`scripts.tasks.survival.risk`) and maps of the earliest time bin (or ``map_class``)."""
    t0 = time.perf_counter()
    probs = bag_probabilities(network, entry, num_clusters, per_cluster, num_bags, replacement, seed, device, chunk)
    mean = probs.mean(0).numpy()
    if task == "survival":
        from scripts.tasks.survival import risk

        probability, shown = float(risk(mean)), (0 if map_class is None else map_class)
    elif probs.shape[1] == 2:
        probability, shown = float(probs[:, 1].contiguous().mean()), map_class
    else:
        shown = int(mean.argmax()) if map_class is None else map_class
        probability = float(mean[int(mean.argmax())])
    if shown is not None and not 0 <= shown < probs.shape[1]:
        raise BundleInputError(None, f"map_class {shown} is not a class of the model (0..{probs.shape[1] - 1})",
                               "give --map_class as a class index of the model's label_map (or leave it out)")
    attention, scale = patch_attention(network, entry, num_clusters, device, shown)
    return SlidePrediction(entry.slide_id, probability, attention, scale, time.perf_counter() - t0, mean, shown)


def scale_name(mpp: float) -> str:
    """Conventional magnification of a resolution: 0.5 µm/px -> '20x', 1 -> '10x', 2 -> '5x'."""
    return f"{10.0 / float(mpp):g}x"
