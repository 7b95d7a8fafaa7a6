"""The device side: ORT sessions for the head (and full.onnx, the local fallback).

Device-friendly settings: a fixed thread count, sequential execution, and no spinning
(`session.intra_op.allow_spinning` = 0) so idle ORT threads do not burn a Pi's cores.
numpy + onnxruntime only (the [edge] extra).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..formats.manifest import ManifestError, load_manifest, variant
from ..formats.codec_wire import WireError, find_codec

HEAD_KINDS = ("fp32", "int8", "tok8", "tok16")   # tok8: int8 tokens + scales; tok16: fp16 tokens


def device_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0              # 0 = ORT's default (physical cores)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Head:
    """head_k{K}[_int8|_tok8|_tok16].onnx: images (B,3,H,W) -> {"tokens", "indices"[, "scales"]};
    with `codec` ('16x4'), head_k{K}_c16x4.onnx: images -> {"codes" uint8 (B,1+K,d), "indices"}."""

    def __init__(self, export_dir: str | Path, keep_ratio: float | None = None, kind: str = "fp32",
                 threads: int | None = None, manifest: dict | None = None, codec: str | None = None):
        if kind not in HEAD_KINDS:
            raise ManifestError(f"head kind {kind!r}: use one of {HEAD_KINDS}")
        self.export_dir = Path(export_dir)
        self.manifest = manifest if manifest is not None else load_manifest(export_dir)
        self.variant = variant(self.manifest, keep_ratio)
        self.codec = None
        if codec is not None:
            try:
                self.codec = find_codec(self.variant, codec)
            except WireError as e:
                raise ManifestError(str(e)) from None
            entry = self.codec["head"]
        else:
            entry = self.variant.get("head" if kind == "fp32" else f"head_{kind}")
        if not entry:
            raise ManifestError(f"{self.export_dir} has no {kind} head for keep ratio "
                                f"{self.variant['keep_ratio']} (export it with that option)")
        self.kind, self.file = ("codec" if codec else kind), entry["file"]
        self.keep = self.variant["keep_tokens"]
        self.session = device_session(self.export_dir / self.file, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self.outputs, out))


class FullModel:
    """full.onnx, the whole vanilla model on the device: images -> logits (B, C)."""

    def __init__(self, export_dir: str | Path, threads: int | None = None, manifest: dict | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = manifest if manifest is not None else load_manifest(export_dir)
        full = self.manifest.get("full")
        if not full:
            raise ManifestError(f"{self.export_dir} has no full model (full.onnx) for a local fallback")
        self.session = device_session(self.export_dir / full["file"], threads)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]
