"""The cloud side: an ORT session for the tail, on CUDA or CPU, never silently on the wrong one.

provider "cuda" fails unless CUDAExecutionProvider is really in the session's providers
(ORT would otherwise fall back to CPU with only a warning); "auto" takes CUDA when the
installed onnxruntime has it. On CUDA the inputs and output go through IOBinding.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..formats.manifest import ManifestError, load_manifest, variant
from ..formats.codec_wire import WireError, find_codec, load_dictionary

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The requested execution provider is not available."""


def model_name(keep_tokens: int, codec: str | None = None) -> str:
    """Served model name for a keep count [and codec], shared with the Triton repository (docs/FORMAT.md)."""
    return f"mercury_tail_k{keep_tokens}" + (f"_c{codec}" if codec else "")


def tail_file(export_dir: str | Path, variant_entry: dict, dtype: str) -> str:
    """The tail file of a manifest variant in `dtype` (float32 | float16), or ManifestError."""
    entry = variant_entry.get("tail" if dtype == "float32" else "tail_fp16")
    if dtype not in ("float32", "float16") or not entry:
        raise ManifestError(f"{export_dir} has no {dtype} tail for keep ratio {variant_entry['keep_ratio']}")
    return entry["file"]


def resolve_provider(provider: str) -> str:
    if provider not in ("auto", "cuda", "cpu"):
        raise ProviderError(f"provider {provider!r}: use auto, cuda or cpu")
    available = ort.get_available_providers()
    if provider == "auto":
        return "cuda" if CUDA in available else "cpu"
    if provider == "cuda" and CUDA not in available:
        raise ProviderError(f"--provider cuda, but this onnxruntime has only {available}: "
                            "install onnxruntime-gpu (the [cloud] extra) with a matching CUDA")
    return provider


class Tail:
    """tail_k{K}[_fp16].onnx: tokens (B,P+K,D), indices (B,K) int64 -> logits (B,C) float32.
    P = num_prefix_tokens (manifests written before it was recorded: 1, the CLS).

    With `codec` ('16x4'): tail_k{K}_c16x4.onnx, which takes the head's uint8 codes (B,P+K,d)
    and dequantises inside; `codec_entry` and `dictionary` (checked against the manifest) are
    what the server decodes payloads with."""

    def __init__(self, export_dir: str | Path, keep_ratio: float | None = None, provider: str = "auto",
                 dtype: str = "float32", threads: int | None = None, manifest: dict | None = None,
                 variant_entry: dict | None = None, codec: str | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = manifest if manifest is not None else load_manifest(export_dir)
        self.variant = variant_entry or variant(self.manifest, keep_ratio)
        self.codec_entry, self.dictionary = None, None
        if codec is not None:
            try:
                self.codec_entry = find_codec(self.variant, codec)
                self.dictionary = load_dictionary(self.export_dir, self.codec_entry)
            except WireError as e:
                raise ManifestError(str(e)) from None
            self.file, self.io_dtype = self.codec_entry["tail"]["file"], np.dtype(np.uint8)
        else:
            self.file, self.io_dtype = tail_file(self.export_dir, self.variant, dtype), np.dtype(dtype)
        self.input = "codes" if codec else "tokens"
        self.keep = self.variant["keep_tokens"]
        self.dim, self.num_patches = self.manifest["dim"], self.manifest["num_patches"]
        if self.codec_entry:
            self.dim = self.codec_entry["dims"]                         # the tail's input width: d
        self.num_classes = len(self.manifest.get("classes") or []) or None
        self.name = model_name(self.keep, self.codec_entry["name"] if self.codec_entry else None)
        self.provider = resolve_provider(provider)

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        # no busy-waiting between runs: a server's event loop needs that CPU (CUDA is unaffected)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [CUDA, CPU] if self.provider == "cuda" else [CPU]
        self.session = ort.InferenceSession(str(self.export_dir / self.file), so, providers=providers)
        if self.provider == "cuda" and CUDA not in self.session.get_providers():
            raise ProviderError(f"CUDA was requested but the session runs on {self.session.get_providers()} "
                                "(CUDA/cuDNN libraries missing or mismatched?); refusing to fall back to CPU")
        out = self.session.get_outputs()[0]
        if self.num_classes is None and isinstance(out.shape[-1], int):
            self.num_classes = out.shape[-1]

    def __call__(self, tokens: np.ndarray, indices: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=self.io_dtype)     # (B, P+K, D), or codes (B, P+K, d)
        indices = np.ascontiguousarray(indices, dtype=np.int64)        # (B, K)
        if self.provider == "cuda":
            io = self.session.io_binding()
            io.bind_cpu_input(self.input, tokens)
            io.bind_cpu_input("indices", indices)
            io.bind_output("logits", "cuda")
            self.session.run_with_iobinding(io)
            logits = io.copy_outputs_to_cpu()[0]
        else:
            logits = self.session.run(["logits"], {self.input: tokens, "indices": indices})[0]
        return logits.astype(np.float32, copy=False)                   # (B, C)
