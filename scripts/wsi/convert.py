"""Convert one plain picture (JPEG, PNG, BMP, ...) into a pyramidal TIFF slide the bundle reads.

A photo or an exported region is not a whole-slide image: it has no pyramid and no resolution metadata. Given
its level-0 µm per px, this writes a tiled pyramidal TIFF (:func:`scripts.wsi.pyramid.write_pyramid`)::

    python -m scripts.wsi.convert photo.jpg photo.tif --mpp 0.5
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from scripts.errors import BundleInputError
from scripts.wsi.pyramid import write_pyramid

logger = logging.getLogger(__name__)

#: file signatures of plain (single-resolution) picture formats: (prefix, name)
PICTURE_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                      (b"RIFF", "WebP"))


def picture_format(path: str | Path) -> str | None:
    """The plain picture format ``path`` holds by its first bytes (``'JPEG'``, ``'PNG'``, ...), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    for prefix, name in PICTURE_SIGNATURES:
        if head.startswith(prefix) and (name != "WebP" or head[8:12] == b"WEBP"):
            return name
    return None


def convert_picture(source: str | Path, target: str | Path, mpp: float) -> Path:
    """Write ``source`` (any picture Pillow reads) as a pyramidal TIFF at ``mpp`` µm per px; returns ``target``."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # an explicit conversion of the user's own file
    try:
        with Image.open(source) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as err:
        raise BundleInputError(source, f"cannot be read as a picture ({type(err).__name__}: {err})", "pass a JPEG, PNG or BMP file") from err
    downsamples = [1]
    while min(rgb.shape[:2]) // (downsamples[-1] * 2) >= 256:
        downsamples.append(downsamples[-1] * 2)
    return write_pyramid(target, rgb, mpp=mpp, downsamples=downsamples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the picture (JPEG, PNG, BMP, ...)")
    parser.add_argument("target", help="the pyramidal TIFF to write (.tif)")
    parser.add_argument("--mpp", type=float, required=True, help="level-0 µm per px of the picture, e.g. 0.5 (20x)")
    args = parser.parse_args(argv)
    out = convert_picture(args.source, args.target, args.mpp)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook(signals=True)
    raise SystemExit(main())
