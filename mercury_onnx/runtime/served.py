"""The served-model table of the tail's protocol: which tails an export serves, under which
names, with which geometry, model id and codec (runtime/protocol.py re-exports it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..formats import codec_wire
from ..formats.manifest import ManifestError, load_manifest, variant
from .tail import Tail, model_name, tail_file

TOKEN_TYPES, INDEX_TYPES = ("FP32", "FP16", "INT8"), ("INT64", "INT32", "INT16")


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One served tail, as the protocol sees it: name, geometry and model id (no session)."""
    name: str                       # mercury_tail_k{K}
    model_id: str                   # the manifest's; requests must carry it
    keep_ratio: float
    keep: int                       # K kept patch tokens
    dim: int                        # D
    num_patches: int                # N: indices lie in [0, N)
    num_classes: int | None
    io_dtype: np.dtype              # the tail's token dtype (float32 | float16; uint8 codes for a codec)
    export_dir: Path
    manifest: dict = field(repr=False)
    variant: dict = field(repr=False)
    codec: dict | None = field(default=None, repr=False)          # the manifest's codec entry
    dictionary: bytes | None = field(default=None, repr=False)    # its zstd dictionary, checked

    @property
    def tokens_shape(self) -> tuple[int, int]:
        """One image's tokens: the P prefix tokens (manifest `num_prefix_tokens`; manifests
        written before it was recorded mean 1, the CLS) + K kept patch tokens, D wide (d codes
        for a codec)."""
        return (self.manifest.get("num_prefix_tokens", 1) + self.keep,
                self.codec["dims"] if self.codec else self.dim)

    def load_tail(self, provider: str = "auto", threads: int | None = None) -> Tail:
        """The ORT session for this model (raises ProviderError when the provider is missing)."""
        return Tail(self.export_dir, provider=provider, dtype=self.io_dtype.name, threads=threads,
                    manifest=self.manifest, variant_entry=self.variant,
                    codec=self.codec["name"] if self.codec else None)

    def metadata(self) -> dict:
        """GET /v2/models/{name}: the v2 model metadata, plus what else the server accepts."""
        if self.codec:
            c = self.codec
            return {"name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "codes", "datatype": "UINT8", "shape": [-1, *self.tokens_shape]},
                               {"name": "indices", "datatype": "INT64", "shape": [-1, self.keep]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, self.num_classes or -1]}],
                    "parameters": {"model_id": self.model_id, "keep_ratio": self.keep_ratio,
                                   "keep_tokens": self.keep, "num_patches": self.num_patches,
                                   "codec": c["name"], "codec_id": c["codec_id"], "dims": c["dims"],
                                   "bits": c["bits"], "kind": c.get("kind", "fixed"), "dictionary": bool(self.dictionary),
                                   "accepts": {"payload": "UINT8 [L]: a codec payload (docs/FORMAT.md)",
                                               "codes": "UINT8 [-1, P+K, d] with 'indices'"}}}
        tok = "FP16" if self.io_dtype == np.float16 else "FP32"
        return {"name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "tokens", "datatype": tok, "shape": [-1, *self.tokens_shape]},
                           {"name": "indices", "datatype": "INT64", "shape": [-1, self.keep]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, self.num_classes or -1]}],
                "parameters": {"model_id": self.model_id, "keep_ratio": self.keep_ratio,
                               "keep_tokens": self.keep, "num_patches": self.num_patches,
                               "accepts": {"tokens": list(TOKEN_TYPES), "indices": list(INDEX_TYPES),
                                           "scales": "FP32 [-1, P+K, 1] with INT8 tokens"}}}


def served_models(export_dir: str | Path, keep_ratios: Sequence[float] | None = None,
                  tail_dtype: str = "float32") -> dict[str, ServedModel]:
    """{name: ServedModel}, one per exported keep ratio (or per ratio asked for). Reads and
    verifies manifest.json; raises ManifestError when a ratio or the tail dtype is missing."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    entries = manifest["variants"] if not keep_ratios else [variant(manifest, r) for r in keep_ratios]
    num_classes = len(manifest.get("classes") or []) or manifest.get("num_classes")
    models = {}
    for v in entries:
        tail_file(export_dir, v, tail_dtype)
        m = ServedModel(model_name(v["keep_tokens"]), manifest["model_id"], v["keep_ratio"], v["keep_tokens"],
                        manifest["dim"], manifest["num_patches"], num_classes, np.dtype(tail_dtype),
                        export_dir, manifest, v)
        models[m.name] = m
        for c in v.get("codecs") or []:          # every codec of the variant is served too
            try:
                dic = codec_wire.load_dictionary(export_dir, c)
            except codec_wire.WireError as e:
                raise ManifestError(str(e)) from None
            mc = ServedModel(model_name(v["keep_tokens"], c["name"]), manifest["model_id"], v["keep_ratio"],
                             v["keep_tokens"], manifest["dim"], manifest["num_patches"], num_classes,
                             np.dtype(np.uint8), export_dir, manifest, v, c, dic)
            models[mc.name] = mc
    return models



def server_metadata(models: Mapping[str, ServedModel], model_id: str) -> dict:
    """GET /v2."""
    return {"name": "mercury-serve-tail", "version": "1", "extensions": ["binary_tensor_data"],
            "model_id": model_id, "models": sorted(models)}
