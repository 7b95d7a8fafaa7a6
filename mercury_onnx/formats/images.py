"""Image folders and the preprocessing spec: what the head is fed, the same in calibration,
export validation, int8 calibration and on the device.

An image folder is DIR/<class>/<image> (ImageFolder): class folders in sorted order (hidden
ones skipped), image files (IMAGE_EXTS) sorted within each. An image is resized so its shorter
side fits the model's input, centre-cropped, bilinear: the device's rule, chosen by measuring
what the other rules would change (docs/results/formats.md, benchmarks/resize_rule.py). Then
(x/255 - mean) / std with the manifest's "preprocess" {size (H, W), mean, std}.

numpy + PIL (imported when an image is read); no torch. One error type, ImageError, whose
message names the file or folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


class ImageError(ValueError):
    """An image or image folder that cannot be read; the message names the file or folder."""


def list_images(root: str | Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, classes) of an image folder. With `classes` (a model's, in its order)
    the class folders must be exactly those; labels follow that order. Without, a folder of
    image files and no class folders (../shared/data/imagenet-sample) is one class named ""."""
    root = Path(root)
    if not root.exists():
        raise ImageError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ImageError(f"{root} is not a folder; expected DIR/<class>/<image files>")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not found and flat and classes is None:   # a flat folder of photos (imagenet-sample): one class ""
        return flat, [0] * len(flat), [""]
    if not found:
        raise ImageError(f"{root} has no class folders; expected DIR/<class>/<image files>")
    if classes is not None:
        missing = [c for c in classes if c not in found]
        extra = [c for c in found if c not in classes]
        if missing or extra:
            raise ImageError(f"class folders in {root} do not match the model's classes: "
                             f"missing {missing}, unexpected {extra}")
    else:
        classes = found
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ImageError(f"class folder {root / name} has no images ({', '.join(IMAGE_EXTS)})")
        paths += files
        labels += [label] * len(files)
    return paths, labels, list(classes)


def pick(labels: list[int], n: int, offset: int = 0) -> list[int]:
    """Positions of n images spread over the classes (round robin in file order), after
    skipping the first `offset` picks: deterministic, no seed."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return order[offset: offset + n]


def load_image(image):
    """A path or PIL image -> an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(Path(image)) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {image}") from e
    except (OSError, ValueError, SyntaxError) as e:      # PIL raises all three on broken files
        raise ImageError(f"cannot read {image} as an image: {e}") from e


def resize_crop(im, h: int, w: int, resample: str = "bilinear"):
    """Resize so the image covers (h, w), then centre-crop: the one resize rule."""
    from PIL import Image

    if im.size == (w, h):
        return im
    scale = max(h / im.height, w / im.width)
    rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    im = im.resize((rw, rh), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample])
    left, top = (rw - w) // 2, (rh - h) // 2
    return im.crop((left, top, left + w, top + h))


def decode(images, size: tuple[int, int]) -> np.ndarray:
    """Paths or PIL images -> uint8 (B, H, W, 3) at size (H, W)."""
    h, w = size
    out = np.empty((len(images), h, w, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(resize_crop(load_image(im), h, w))
    return out


def normalise(batch: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), (x/255 - mean) / std."""
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0         # (B, 3, H, W)
    return (x - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(1, 3, 1, 1)


def preprocess(images, pre: dict) -> np.ndarray:
    """Paths or PIL images -> the (B, 3, H, W) float32 batch the head (and full.onnx) take."""
    return normalise(decode(images, tuple(pre["size"])), pre["mean"], pre["std"])
