"""Real images for validation and int8 calibration: an ImageFolder-style tree
(`DIR/<class>/*.jpg`, e.g. ../shared/data/cifar10/test) read with PIL, resized to the model's
input and normalised. numpy only (no torch), so the same arrays feed ORT and torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(data_dir: str | Path) -> list[tuple[Path, str]]:
    """(path, class folder) for every image, class folders in sorted order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {data_dir}")
    out = []
    for cls in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        out += [(f, cls.name) for f in sorted(cls.iterdir()) if f.suffix.lower() in EXTS]
    if not out:
        raise FileNotFoundError(f"no images in {data_dir} (expected {data_dir}/<class>/*.jpg)")
    return out


def pick(files: list[tuple[Path, str]], n: int, offset: int = 0) -> list[tuple[Path, str]]:
    """n images spread over the classes (round robin), skipping the first `offset` picks."""
    by_class: dict[str, list[Path]] = {}
    for f, c in files:
        by_class.setdefault(c, []).append(f)
    order = []
    for i in range(max(len(v) for v in by_class.values())):
        order += [(v[i], c) for c, v in by_class.items() if i < len(v)]
    return order[offset: offset + n]


def load_images(data_dir: str | Path, n: int, size: tuple[int, int], mean, std,
                classes: list[str] | None = None, offset: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """n images -> float32 (n, 3, H, W) normalised, and int64 labels (n,) when the folder
    names are the model's classes (else None)."""
    from PIL import Image

    chosen = pick(list_images(data_dir), n, offset)
    h, w = size
    mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(std, np.float32).reshape(3, 1, 1)
    batch = np.empty((len(chosen), 3, h, w), np.float32)
    for i, (f, _) in enumerate(chosen):
        img = Image.open(f).convert("RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        batch[i] = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    labels = None
    if classes and all(c in classes for _, c in chosen):
        labels = np.array([classes.index(c) for _, c in chosen], np.int64)
    return batch, labels
