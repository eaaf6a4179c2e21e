"""Colour augmentations for SimSiam that MONAI does not provide (it has no hue/saturation jitter or
random grayscale). Everything else in the pretraining chain (crops, flips, blur) is a MONAI transform.

Images are float CHW RGB in [0, 1].
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _gray(img: torch.Tensor) -> torch.Tensor:
    return (img * _LUMA.to(img).view(3, 1, 1)).sum(0, keepdim=True)


class RandColorJitterd(RandomizableTransform, MapTransform):
    """With probability ``prob``: random brightness, contrast and saturation factors in ``1 ± strength``
    and a hue shift (RGB rotation about the grey axis) of up to ``hue`` turns, in random order."""

    def __init__(
        self, keys: KeysCollection, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
        hue: float = 0.1, prob: float = 0.8,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.strength = (brightness, contrast, saturation)
        self.hue = hue

    def _hue_matrix(self, turns: float) -> torch.Tensor:
        theta = torch.tensor(2 * torch.pi * turns)
        c, s = torch.cos(theta), torch.sin(theta)
        k = torch.ones(3, 3) / 3
        cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / (3**0.5)
        return c * torch.eye(3) + (1 - c) * k + s * cross

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(None)
            if not self._do_transform:
                continue
            img = torch.as_tensor(d[key]).float()
            factors = [float(self.R.uniform(max(0.0, 1 - s), 1 + s)) for s in self.strength]
            for op in self.R.permutation(4):
                if op == 0:
                    img = img * factors[0]
                elif op == 1:
                    img = (img - _gray(img).mean()) * factors[1] + _gray(img).mean()
                elif op == 2:
                    g = _gray(img)
                    img = (img - g) * factors[2] + g
                elif self.hue > 0:
                    m = self._hue_matrix(float(self.R.uniform(-self.hue, self.hue))).to(img)
                    img = torch.einsum("ij,jhw->ihw", m, img)
            d[key] = img.clamp(0, 1)
        return d


class RandGrayscaled(RandomizableTransform, MapTransform):
    """With probability ``prob`` replace RGB by its luma, repeated on 3 channels."""

    def __init__(self, keys: KeysCollection, prob: float = 0.2) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(None)
            if self._do_transform:
                d[key] = _gray(torch.as_tensor(d[key]).float()).repeat(3, 1, 1)
        return d
