"""Write the shipped reference calibration (mercury_onnx/data/reference/) from a Mercury checkpoint.

Kept apart from models/reference.py, which checkpoint.py imports to read it: writing needs
checkpoint.py, and the import graph stays acyclic (tests/test_structure.py).
Used by benchmarks/ship_reference.py (benchmarks/reproduce.sh calibration).
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import checkpoint_paths, read_checkpoint_json
from .config import ConfigError
from .reference import DATA, META_JSON, META_WEIGHTS, backbone_weights, sha256_file


def write(checkpoint: str | Path, backbone: str | Path, accuracy: dict | None = None,
          out_dir: Path = DATA) -> tuple[Path, Path]:
    """Ship `checkpoint`'s meta-parameters (its backbone must equal `backbone` exactly)."""
    import torch
    from safetensors.torch import load_file, save_file

    ck = read_checkpoint_json(checkpoint)
    weights, _ = checkpoint_paths(checkpoint)
    tensors = load_file(str(weights))
    bb_weights = backbone_weights(Path(backbone))
    bb = load_file(str(bb_weights))
    mine = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    if set(mine) != set(bb) or any(not torch.equal(mine[k], bb[k]) for k in bb):
        raise ConfigError(f"{weights}'s backbone differs from {bb_weights}: not a calibration of that backbone")
    config = {k: v for k, v in ck["config"].items() if k != "checkpoint"}
    n = (config["overrides"]["img_size"] // config["overrides"]["patch_size"]) ** 2
    meta = {"format": ck["format"], "config": config, "keep_tokens": ck["keep_tokens"], "num_patches": n,
            "backbone": {"json": Path(backbone).name, "file": bb_weights.name, "sha256": sha256_file(bb_weights)},
            "calibration": ck["calibration"]}
    if accuracy:
        meta["accuracy"] = accuracy
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items() if k.startswith("meta.")},
              str(out_dir / META_WEIGHTS.name))
    (out_dir / META_JSON.name).write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir / META_WEIGHTS.name, out_dir / META_JSON.name
