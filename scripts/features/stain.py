"""Stain normalisation (Macenko, Reinhard) as batched, TorchScript-able device modules, and H&E stain augmentation.

Normalisation runs where the patches meet the encoder: the first step of the encoders' device input layer
(:func:`scripts.features.device_preprocessing.attach`), before intensity scaling, for built-in, exported and named
encoders alike. The same module is scripted into the Deploy export, so extraction, inference and the Deploy app
compute identical features (tested bit for bit on the CPU). It is declared in the patch chain as the
:class:`StainNormalized` transform (``stain_normalization`` / ``stain_target`` in configs/train.yaml), whose settings
are part of the feature store's hash and of the checkpoint contract.

- **Macenko** (Macenko et al. 2009) repeats MONAI's ``NormalizeHEStains`` / ``ExtractHEStains`` arithmetic (optical
  density, eigenvectors of the tissue pixels' covariance, 1st / 99th angle percentiles, H/E order by red/blue
  ratio, concentrations by least squares, 99th-percentile scaling to the target's) on a batch, in torch, so it runs
  on the GPU inside the encoder; tested against MONAI's numpy implementation. MONAI's transform is per image on
  the host and raises on background patches; here a patch with too few tissue pixels passes unchanged.
- **Reinhard** (Reinhard et al. 2001) matches per-channel mean and standard deviation in CIE L*a*b* (sRGB, D65) to
  the target's; the statistics come from the patch's tissue pixels (L* below ``tissue_l``), the mapping applies to
  every pixel. No library offers it as a batched torch module (staintools and torchstain work per image).

Targets: the method's standard reference (Macenko: MONAI's reference stain matrix and maximum concentrations;
Reinhard: the tissue of ``tests/data/CMU-1-Small-Region.svs``, OpenSlide's public Aperio sample), or fitted to a
given image (:func:`fit_target`).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from torch import nn

METHODS = ("macenko", "reinhard")
#: MONAI's NormalizeHEStains defaults (Macenko's reference H&E absorbance vectors and maximum concentrations)
MACENKO_TARGET_HE = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_MAX_CREF = (1.9705, 1.0308)
#: L*a*b* mean / std of the tissue of CMU-1-Small-Region.svs (fit_target("reinhard", ...) on its level 0)
REINHARD_TARGET_MEAN = (48.1420, 28.6187, -12.3610)
REINHARD_TARGET_STD = (19.5587, 12.6977, 9.8526)


def optical_density(pixels: torch.Tensor, tli: float) -> torch.Tensor:
    """Absorbance of RGB values in [0, 255] (MONAI's definition: ``-log(min(I + 1, tli) / tli)``)."""
    return -torch.log(torch.clamp(pixels + 1.0, max=tli) / tli)


class MacenkoNormalize(nn.Module):
    """[B, 3, H, W] RGB (uint8 or float in [0, 255]) -> float32 [B, 3, H, W], integer-valued in [0, 255]."""

    def __init__(self, target_he: Sequence[Sequence[float]] = MACENKO_TARGET_HE, max_cref: Sequence[float] = MACENKO_MAX_CREF,
                 tli: float = 240.0, alpha: float = 1.0, beta: float = 0.15, min_tissue: float = 0.01) -> None:
        super().__init__()
        self.method = "macenko"
        self.tli = float(tli)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.min_tissue = float(min_tissue)
        self.register_buffer("target_he", torch.tensor([list(r) for r in target_he], dtype=torch.float32), persistent=False)
        self.register_buffer("max_cref", torch.tensor(list(max_cref), dtype=torch.float32), persistent=False)

    def stain_matrix(self, od: torch.Tensor) -> torch.Tensor:
        """H&E absorbance matrix [3, 2] of one patch's optical densities [N, 3] (float64, at least two tissue pixels)."""
        tissue = od[(od > self.beta).all(dim=1)]
        centred = tissue - tissue.mean(dim=0, keepdim=True)
        cov = centred.t() @ centred / float(tissue.shape[0] - 1)
        _, vecs = torch.linalg.eigh(cov)
        plane = vecs[:, 1:3]
        t_hat = tissue @ plane
        phi = torch.atan2(t_hat[:, 1], t_hat[:, 0])
        q = torch.tensor([self.alpha / 100.0, 1.0 - self.alpha / 100.0], dtype=od.dtype, device=od.device)
        lo_hi = torch.quantile(phi, q)
        v_min = plane @ torch.stack([torch.cos(lo_hi[0]), torch.sin(lo_hi[0])])
        v_max = plane @ torch.stack([torch.cos(lo_hi[1]), torch.sin(lo_hi[1])])
        eps = 1.1920928955078125e-07
        if float(v_min[0] / (v_min[2] + eps)) < float(v_max[0] / (v_max[2] + eps)):  # hematoxylin: the lower red / blue ratio
            return torch.stack([v_min, v_max], dim=1)
        return torch.stack([v_max, v_min], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 throughout: CUDA autocast (bf16 in extraction) leaves float64 alone, so the stain vectors are exact
        x = x.to(torch.float64)
        b, c, h, w = x.shape
        out = torch.empty_like(x)
        q99 = torch.tensor([0.99], dtype=torch.float64, device=x.device)
        target_he = self.target_he.to(torch.float64)
        max_cref = self.max_cref.to(torch.float64)
        for i in range(b):
            pixels = x[i].reshape(c, h * w).t()
            od = optical_density(pixels, self.tli)
            n_tissue = int((od > self.beta).all(dim=1).sum())
            if n_tissue < max(2, int(self.min_tissue * h * w)):  # background: nothing to measure the stains on
                out[i] = x[i]
                continue
            he = self.stain_matrix(od)
            conc = torch.linalg.pinv(he) @ od.t()  # least squares, [2, N]
            max_conc = torch.stack([torch.quantile(conc[0], q99)[0], torch.quantile(conc[1], q99)[0]])
            scaled = conc / (max_conc / max_cref).unsqueeze(1)
            norm = self.tli * torch.exp(-(target_he @ scaled))
            norm = torch.where(norm > 255.0, torch.full_like(norm, 254.0), norm)
            out[i] = torch.floor(norm).reshape(c, h, w)
        return out.to(torch.float32)

    @torch.jit.unused
    def settings(self) -> dict:
        return stain_settings(self)


def _srgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, N] sRGB in [0, 1] -> CIE L*a*b* (D65)."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
                     dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjn->bin", m, lin) / torch.tensor([0.95047, 1.0, 1.08883], dtype=x.dtype, device=x.device).view(1, 3, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    return torch.stack([116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], dim=1)


def _lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    fy = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack([fy + lab[:, 1] / 500.0, fy, fy - lab[:, 2] / 200.0], dim=1)
    xyz = torch.where(f > 0.206893, f ** 3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * torch.tensor([0.95047, 1.0, 1.08883], dtype=lab.dtype, device=lab.device).view(1, 3, 1)
    m = torch.tensor([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560], [0.0556434, -0.2040259, 1.0572252]],
                     dtype=lab.dtype, device=lab.device)
    lin = torch.einsum("ij,bjn->bin", m, xyz).clamp(0.0, 1.0)
    return torch.where(lin > 0.0031308, 1.055 * lin ** (1.0 / 2.4) - 0.055, 12.92 * lin)


class ReinhardNormalize(nn.Module):
    """[B, 3, H, W] RGB (uint8 or float in [0, 255]) -> float32 [B, 3, H, W] in [0, 255]: L*a*b* channels shifted and
    scaled from the patch's tissue statistics to the target's."""

    def __init__(self, target_mean: Sequence[float] = REINHARD_TARGET_MEAN, target_std: Sequence[float] = REINHARD_TARGET_STD,
                 tissue_l: float = 88.0, min_tissue: float = 0.01) -> None:
        super().__init__()
        self.method = "reinhard"
        self.tissue_l = float(tissue_l)
        self.min_tissue = float(min_tissue)
        self.register_buffer("target_mean", torch.tensor(list(target_mean), dtype=torch.float32).view(1, 3, 1), persistent=False)
        self.register_buffer("target_std", torch.tensor(list(target_std), dtype=torch.float32).view(1, 3, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        lab = _srgb_to_lab(x.to(torch.float64).reshape(b, c, h * w) / 255.0)  # float64: CUDA autocast leaves it alone
        tissue = (lab[:, 0] < self.tissue_l).to(lab.dtype).unsqueeze(1)  # [B, 1, N]
        count = tissue.sum(dim=2, keepdim=True)
        enough = count >= max(2.0, self.min_tissue * h * w)
        weights = torch.where(enough, tissue, torch.ones_like(tissue))
        n = weights.sum(dim=2, keepdim=True)
        mean = (lab * weights).sum(dim=2, keepdim=True) / n
        std = torch.sqrt(((lab - mean) ** 2 * weights).sum(dim=2, keepdim=True) / n).clamp(min=1e-3)
        mapped = (lab - mean) / std * self.target_std.to(torch.float64) + self.target_mean.to(torch.float64)
        rgb = _lab_to_srgb(torch.where(enough, mapped, lab)) * 255.0
        return rgb.reshape(b, c, h, w).to(torch.float32)

    @torch.jit.unused
    def settings(self) -> dict:
        return stain_settings(self)


def stain_settings(module: nn.Module) -> dict:
    """The settings of a normalisation module, eager or TorchScript (read from its attributes and buffers)."""
    if str(module.method) == "macenko":
        return {"method": "macenko", "target_he": module.target_he.tolist(), "max_cref": module.max_cref.tolist(), "tli": float(module.tli),
                "alpha": float(module.alpha), "beta": float(module.beta), "min_tissue": float(module.min_tissue)}
    return {"method": "reinhard", "target_mean": module.target_mean.flatten().tolist(), "target_std": module.target_std.flatten().tolist(),
            "tissue_l": float(module.tissue_l), "min_tissue": float(module.min_tissue)}


def build_stain(method: str | None, **target: Any) -> nn.Module | None:
    """The normalisation module of ``method`` (None -> None) with the given target values (defaults: the standard ones)."""
    if method is None or str(method).lower() in ("", "none", "null"):
        return None
    method = str(method).lower()
    if method == "macenko":
        return MacenkoNormalize(**{k: v for k, v in target.items() if k in ("target_he", "max_cref", "tli", "alpha", "beta", "min_tissue")})
    if method == "reinhard":
        return ReinhardNormalize(**{k: v for k, v in target.items() if k in ("target_mean", "target_std", "tissue_l", "min_tissue")})
    from scripts.errors import BundleInputError

    raise BundleInputError(None, f"unknown stain_normalization '{method}'", f"use one of {list(METHODS)} or null")


def fit_target(method: str, image: np.ndarray) -> dict:
    """Target values of ``method`` measured on ``image`` (H x W x 3 uint8 RGB, e.g. a reference tile)."""
    x = torch.as_tensor(np.array(image)).permute(2, 0, 1).unsqueeze(0).to(torch.float64)
    if method == "macenko":
        m = MacenkoNormalize()
        od = optical_density(x[0].reshape(3, -1).t(), m.tli)
        he = m.stain_matrix(od)
        conc = torch.linalg.pinv(he) @ od.t()
        return {"target_he": he.tolist(), "max_cref": torch.quantile(conc, 0.99, dim=1).tolist()}
    if method == "reinhard":
        lab = _srgb_to_lab(x.reshape(1, 3, -1) / 255.0)[0]
        tissue = lab[:, lab[0] < 88.0]  # float64
        return {"target_mean": tissue.mean(dim=1).tolist(), "target_std": tissue.std(dim=1, unbiased=False).tolist()}
    raise ValueError(f"unknown method {method!r}")


def target_from_file(method: str | None, path: str | None) -> dict:
    """The target values of ``method`` in full (recorded so, in the contract): fitted to the image at ``path`` (a
    picture, or the centre of a slide at 4x its level-0 µm per px), or the method's standard reference without one;
    ``{}`` without a method."""
    if method in (None, "", "none"):
        return {}
    if not path:
        return {k: v for k, v in stain_settings(build_stain(method)).items() if k != "method"}
    from pathlib import Path

    from PIL import Image

    from scripts.errors import BundleInputError

    p = Path(path)
    if not p.is_file():
        raise BundleInputError(p, "stain target image not found", "pass an RGB picture of well-stained tissue as --stain_target (or null)")
    try:
        with Image.open(p) as im:
            image = np.asarray(im.convert("RGB"))
    except Exception:  # noqa: BLE001 - not a picture: a slide
        from scripts.wsi.slide import SlideReader

        with SlideReader(p, mpp=0.5) as s:
            plan = s.plan(s.mpp * 4, min(2048, min(s.size) // 4))
            image = s.read_patch((s.size[1] / 2.0, s.size[0] / 2.0), plan)
    return {k: v for k, v in stain_settings(build_stain(method, **fit_target(method, image))).items() if k != "method"}


class StainNormalized(MapTransform):
    """The stain normalisation of the patch chain (``keys``: the scales' patches, CHW uint8 or float in [0, 255]).

    In extraction, inference and the Deploy app the chain is split and this step runs on the device as the
    encoders' first layer (:func:`scripts.features.device_preprocessing.split_transform`); called directly (a chain
    that is not split) it applies the same module to each patch. Its public attributes are the settings the feature
    store hashes."""

    def __init__(self, keys: KeysCollection, method: str, target: Mapping[str, Any] | None = None) -> None:
        super().__init__(keys)
        self.method = str(method)
        self.settings = {k: v for k, v in build_stain(method, **dict(target or {})).settings().items() if k != "method"}

    def module(self) -> nn.Module:
        return build_stain(self.method, **self.settings)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        m = self.module()
        for key in self.key_iterator(d):
            d[key] = m(torch.as_tensor(np.asarray(d[key])).unsqueeze(0))[0]
        return d


#: Ruifrok & Johnston's H, E, DAB optical-density vectors (rows; scikit-image's rgb_from_hed)
RUIFROK_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


def ruifrok_matrices() -> tuple[np.ndarray, np.ndarray]:
    """``(rgb_from_hed, hed_from_rgb)``: Ruifrok's unit-length H, E, DAB vectors and their inverse (float64), for
    colour deconvolution of optical densities ``od @ hed_from_rgb`` and back."""
    m = np.asarray(RUIFROK_HED, dtype=np.float64)
    rgb_from_hed = m / np.linalg.norm(m, axis=1, keepdims=True)
    return rgb_from_hed, np.linalg.inv(rgb_from_hed)


def hed_jitter(pixels: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, tissue_od: float | None = None,
               rounding: bool = True) -> torch.Tensor:
    """Re-stained RGB batch (Tellez et al. 2018, "HED jitter"): ``pixels`` [B, 3, H, W] in [0, 255] are deconvolved
    into H, E and DAB concentrations (Ruifrok's vectors, optical density ``-log((I + 1) / 256)``), each scaled by
    ``alpha`` [B, 3] and shifted by ``beta`` [B, 3] (only where the optical density sums above ``tissue_od``, if
    given: the white background of a slide stays white), and recomposed; rounded to integers (as a scanner writes
    them) unless ``rounding=False``, clipped to [0, 255]. The arithmetic runs in float64 (autocast leaves it alone);
    the result has ``pixels``' dtype. One implementation for SimSiam's augmentation, the stain views of MIL training
    (:mod:`scripts.features.stain_views`) and the demo's staining sites."""
    rgb_from_hed, hed_from_rgb = (torch.from_numpy(m).to(pixels.device) for m in ruifrok_matrices())
    b, c, h, w = pixels.shape
    od = optical_density(pixels.to(torch.float64), 256.0).reshape(b, c, h * w).transpose(1, 2)  # [B, P, 3]
    shift = beta.to(od).unsqueeze(1)
    if tissue_od is not None:
        shift = shift * (od.sum(-1, keepdim=True) > tissue_od).to(od)
    out = torch.exp(-(((od @ hed_from_rgb) * alpha.to(od).unsqueeze(1) + shift) @ rgb_from_hed)) * 256.0 - 1.0
    out = torch.round(out) if rounding else out
    return out.clamp(0.0, 255.0).transpose(1, 2).reshape(b, c, h, w).to(pixels.dtype)


class RandHEStainJitterd(RandomizableTransform, MapTransform):
    """Stain augmentation for SimSiam (:func:`hed_jitter`): with probability ``prob``, the patch's H, E and DAB
    concentrations are scaled by ``1 ± sigma`` and shifted by ``± bias``, then recomposed. Float CHW RGB in [0, 1]
    (the SimSiam chain's range). Written here: MONAI has no stain augmentation."""

    def __init__(self, keys: KeysCollection, sigma: float = 0.05, bias: float = 0.05, prob: float = 0.8) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.sigma = float(sigma)
        self.bias = float(bias)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(None)
            if not self._do_transform:
                continue
            img = torch.as_tensor(d[key])
            alpha = torch.as_tensor(self.R.uniform(1 - self.sigma, 1 + self.sigma, (1, 3)))
            beta = torch.as_tensor(self.R.uniform(-self.bias, self.bias, (1, 3)))
            out = hed_jitter(img.to(torch.float64).unsqueeze(0) * 255.0, alpha, beta, rounding=False)[0] / 255.0
            d[key] = out.to(img.dtype)
        return d
