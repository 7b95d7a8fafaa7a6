"""ImageFolder data, decoded once into memory: DATA_DIR/<class>/<image>.

Small sets only (CIFAR-sized, or a few thousand ImageNet images): every image is decoded
with PIL and brought to the model's input size by the same rule as export and the device
(mercury_onnx.formats.images), and kept as uint8 (M, H, W, 3).
Normalisation happens in torch, per batch. Decoded arrays can be cached in an .npz under
~/.cache/mercury-onnx (never in the repo), keyed by the folder, the chosen files and size, and
the package version and source (mercury_onnx/cache_key.py).

Bad data raises formats.images.ImageError with a message that names the file or folder.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..formats.images import list_images, load_image, resize_crop

CACHE_DIR = Path(os.environ.get("MERCURY_ONNX_CACHE", Path.home() / ".cache" / "mercury-onnx"))


@dataclass
class Preprocess:
    size: tuple[int, int]        # (H, W) the model takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def preprocess_for(model) -> Preprocess:
    """Input size from the backbone's patch_embed, mean/std from the config (the checkpoint
    JSON's, else timm's pretrained_cfg: create_backbone fills them in)."""
    backbone = getattr(model, "backbone", model)
    cfg = getattr(model, "cfg", None)
    pc = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = (cfg.mean if cfg is not None and cfg.mean else None) or pc.get("mean", (0.485, 0.456, 0.406))
    std = (cfg.std if cfg is not None and cfg.std else None) or pc.get("std", (0.229, 0.224, 0.225))
    h, w = backbone.patch_embed.img_size
    return Preprocess((int(h), int(w)), tuple(mean), tuple(std))


# ---------------------------------------------------------------- choosing

def choose(labels: list[int], count: int | None, seed: int = 0, balanced: bool = False,
           exclude: set[int] | None = None) -> list[int]:
    """Deterministic subset of positions: a seeded shuffle (class-balanced: round-robin over
    classes), sorted. `exclude` holds positions that must not be chosen (a held-out slice)."""
    pool = [i for i in range(len(labels)) if not exclude or i not in exclude]
    if count is None or count >= len(pool):
        return pool
    rng = np.random.default_rng(seed)
    if not balanced:
        return sorted(rng.permutation(pool)[:count].tolist())
    by_class: dict[int, list[int]] = {}
    for i in rng.permutation(pool).tolist():
        by_class.setdefault(labels[i], []).append(i)
    picked, queues = [], [by_class[c] for c in sorted(by_class)]
    while len(picked) < count:
        for q in queues:
            if q and len(picked) < count:
                picked.append(q.pop())
    return sorted(picked)


# ---------------------------------------------------------------- decoding

def decode(paths: list[Path], size: tuple[int, int], progress: bool = False) -> np.ndarray:
    """uint8 (M, H, W, 3) at `size`, by the one preprocessing rule (formats.images.resize_crop)."""
    from tqdm import tqdm

    h, w = size
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    for n, p in enumerate(tqdm(paths, desc="decode", disable=not progress, leave=False)):
        out[n] = np.asarray(resize_crop(load_image(p), h, w))
    return out


def _cache_file(root: Path, paths: list[Path], size: tuple[int, int]) -> Path:
    from ..cache_key import cache_key

    # the resize rule, the package version and its source are in the key: changed code is a new entry
    h = hashlib.sha256(f"{root.resolve()}|{size}|{len(paths)}|resize-crop-bilinear|{cache_key()}".encode())
    for p in paths:
        h.update(str(p.relative_to(root)).encode())
    return CACHE_DIR / f"{root.name}_{len(paths)}_{size[0]}x{size[1]}_{h.hexdigest()[:12]}.npz"


# ---------------------------------------------------------------- the set

class ImageSet:
    """Decoded images (uint8, M x H x W x 3) + labels, normalised per batch in torch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], pre: Preprocess,
                 name: str = ""):
        self.images = torch.from_numpy(images)                          # (M, H, W, 3) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.long)         # (M,)
        self.classes, self.pre, self.name = classes, pre, name
        self._mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W), (x/255 - mean) / std."""
        x = raw.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    def batches(self, batch_size: int, order: torch.Tensor | None = None):
        """Yields (images (B,3,H,W) float, labels (B,)) in order (default: stored order)."""
        order = torch.arange(len(self)) if order is None else order
        for s in range(0, len(order), batch_size):
            sel = order[s: s + batch_size]
            yield self.normalise(self.images[sel]), self.labels[sel]

    def subset(self, positions) -> "ImageSet":
        positions = torch.as_tensor(positions, dtype=torch.long)
        return ImageSet(self.images[positions].numpy(), self.labels[positions].numpy(),
                        self.classes, self.pre, self.name)


def load_image_set(root: str | Path, pre: Preprocess, classes: list[str] | None = None,
                   count: int | None = None, seed: int = 0, balanced: bool = True,
                   exclude: set[int] | None = None, cache: bool = False,
                   progress: bool = True) -> tuple[ImageSet, list[int]]:
    """Decode a deterministic subset of an ImageFolder. Returns the set and the positions
    chosen (into the sorted file list), so a caller can hold them out of another subset."""
    root = Path(root)
    paths, labels, classes = list_images(root, classes)
    pos = choose(labels, count, seed, balanced, exclude)
    chosen = [paths[i] for i in pos]
    cache_path = _cache_file(root, chosen, pre.size) if cache else None
    if cache_path is not None and cache_path.exists():
        images = np.load(cache_path)["images"]
    else:
        images = decode(chosen, pre.size, progress=progress)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache_path, images=images)
    return ImageSet(images, np.array([labels[i] for i in pos]), classes, pre, root.name), pos
