"""Area (box-average) resampling of uint8 images, shared by the reader, thumbnails and pyramid writing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` x ``factor`` blocks of an HxW or HxWxC uint8 image (edges that do not fill a block
    are cropped), rounded half up, computed in integers."""
    if factor == 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    img = image[: h * factor, : w * factor]
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    acc = np.uint16 if factor <= 16 else np.uint32  # 255 * factor**2 must fit
    # strided adds (rows, then columns): several times faster than reductions over reshaped axes
    rows = img[0::factor].astype(acc)
    for i in range(1, factor):
        np.add(rows, img[i::factor], out=rows)
    summed = rows[:, 0::factor].copy()
    for j in range(1, factor):
        np.add(summed, rows[:, j::factor], out=summed)
    n = factor * factor
    summed += n // 2
    if n & (n - 1) == 0:
        summed >>= n.bit_length() - 1
    else:
        summed //= n
    out = summed.astype(np.uint8)
    return out[..., 0] if squeeze else out


def resize_area(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Area resize of HxWx3 uint8 to ``size``: :func:`block_mean` for integer factors, torch otherwise."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    fy, fx = image.shape[0] / hw[0], image.shape[1] / hw[1]
    if fy == fx and fy == int(fy) and image.shape[0] % hw[0] == 0 and image.shape[1] % hw[1] == 0:
        return block_mean(image, int(fy))
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()  # a read-only read is copied (torch warns otherwise)
    out = F.interpolate(t, size=hw, mode="area")[0].permute(1, 2, 0)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()
