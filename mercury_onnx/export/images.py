"""Real images for validation and int8 calibration, as the normalised float32 batches ORT and
torch both take. Listing, picking and preprocessing are the shared contract in
mercury_onnx.formats.images, so the export sees exactly what the device will feed the head.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..formats.images import ImageError, list_images, pick, preprocess


def load_images(data_dir: str | Path, n: int, size: tuple[int, int], mean, std,
                classes: list[str] | None = None, offset: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """n images spread over the classes (round robin, after `offset` picks) -> float32
    (n, 3, H, W) normalised, and int64 labels (n,) when the folder names are the model's
    classes (else None). A folder it cannot read raises FileNotFoundError naming it."""
    try:
        paths, labels, found = list_images(data_dir)
        chosen = pick(labels, n, offset)
        batch = preprocess([paths[i] for i in chosen], {"size": size, "mean": mean, "std": std})
    except ImageError as e:             # the pipeline reports unreadable image folders as not found
        raise FileNotFoundError(str(e)) from e
    names = [found[labels[i]] for i in chosen]
    if classes and all(c in classes for c in names):
        return batch, np.array([classes.index(c) for c in names], np.int64)
    return batch, None
