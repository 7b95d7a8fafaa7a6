"""Fixtures of the edge tests: the reference export with an int8 (QDQ) head."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def int8_export(ref_export, tmp_path_factory) -> Path:
    """The session's reference export, plus an int8 (QDQ) head for its last keep ratio when it
    has none: made by the exporter's own quantize_head on a copy, calibrated on 32 real CIFAR-10
    train images and picked on 32 more (the ARM-specific graph must not go unchecked)."""
    from mercury_onnx.export.images import load_images
    from mercury_onnx.formats.manifest import write_manifest
    from mercury_onnx.export.quantize import quantize_head

    from ..conftest import CIFAR_TRAIN

    manifest = json.loads((ref_export / "manifest.json").read_text())
    if any(v.get("head_int8") for v in manifest["variants"]):
        return ref_export
    if not CIFAR_TRAIN.exists():
        pytest.skip(f"CIFAR-10 train images not found at {CIFAR_TRAIN}")
    out = tmp_path_factory.mktemp("int8_export")
    for f in manifest["files"]:
        os.link(ref_export / f, out / f)
    pre, v = manifest["preprocess"], manifest["variants"][-1]
    size, classes = tuple(pre["size"]), manifest.get("classes")
    calib, _ = load_images(CIFAR_TRAIN, 32, size, pre["mean"], pre["std"])
    select, labels = load_images(CIFAR_TRAIN, 32, size, pre["mean"], pre["std"], classes, offset=32)
    v["head_int8"] = {"file": f"head_k{v['keep_tokens']}_int8.onnx"}
    v["head_int8"].update(quantize_head(out / v["head"]["file"], out / v["head_int8"]["file"],
                                        out / v["tail"]["file"], calib, select, labels))
    files = [*manifest.pop("files"), v["head_int8"]["file"]]
    manifest.pop("format")
    write_manifest(out, manifest, files)
    return out
