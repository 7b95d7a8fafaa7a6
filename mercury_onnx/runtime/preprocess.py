"""Image files -> the normalised float32 batch the head (and full.onnx) expect. PIL + numpy.

The manifest's "preprocess" says mean, std and size (H, W). An image of another size is
resized so its shorter side fits, then centre-cropped (bilinear), the usual eval transform.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class ImageError(ValueError):
    """An input that is not a readable image."""


def load_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(Path(image)) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {image}") from e
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read {image} as an image: {e}") from e


def resize_crop(im: Image.Image, h: int, w: int) -> Image.Image:
    if im.size == (w, h):
        return im
    scale = max(h / im.height, w / im.width)
    rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    im = im.resize((rw, rh), Image.BILINEAR)
    left, top = (rw - w) // 2, (rh - h) // 2
    return im.crop((left, top, left + w, top + h))


def preprocess(images, pre: dict) -> np.ndarray:
    """Paths or PIL images -> (B, 3, H, W) float32, (x/255 - mean) / std."""
    h, w = pre["size"]
    mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
    batch = np.stack([np.asarray(resize_crop(load_image(im), h, w), np.uint8) for im in images])
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0         # (B, 3, H, W)
    return (x - mean) / std
