"""Triton Inference Server model repository for the tails (docs/FORMAT.md "Serving names").

    REPO/mercury_tail_k{K}/config.pbtxt
    REPO/mercury_tail_k{K}/1/model.onnx
    REPO/mercury_tail_k{K}_c{D}x{B}/...       one per codec of the export (export --codec)

One model per keep ratio, served by the onnxruntime backend on the GPU with dynamic batching.
A codec tail takes `codes` UINT8 [P+K, d] (dequantised inside the graph): Triton has no
zstd, so a client sends it the decoded codes, not the codec payload (serve-tail takes both);
its config carries the `codec_id` beside the `model_id`.
The fp16 tail is used when the export has one (it is the CUDA variant), else the fp32 tail.
Dims leave out the batch axis (Triton's max_batch_size convention): tokens [P+K, D],
indices [K], logits [C]. Tensor names and dtypes are the tail's, the same as serve-tail.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..formats.manifest import load_manifest

TEMPLATE = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "{tokens_name}"
    data_type: {tokens_type}
    dims: [ {t}, {d} ]
  }},
  {{
    name: "indices"
    data_type: TYPE_INT64
    dims: [ {k} ]
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {c} ]
  }}
]
instance_group [
  {{
    count: 1
    kind: KIND_GPU
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
}}
parameters {{
  key: "model_id"
  value: {{ string_value: "{model_id}" }}
}}
"""
CODEC_PARAMETER = """parameters {{
  key: "codec_id"
  value: {{ string_value: "{codec_id}" }}
}}
"""


def model_name(keep_tokens: int, codec: str | None = None) -> str:
    return f"mercury_tail_k{keep_tokens}" + (f"_c{codec}" if codec else "")


def write_triton_repo(export_dir: str | Path, repo: str | Path, max_batch: int = 64,
                      delay_us: int = 500) -> Path:
    """Copy the (hash-checked) tails of an export folder into a Triton model repository."""
    manifest = load_manifest(export_dir)
    export_dir, repo = Path(export_dir), Path(repo)
    p = manifest.get("num_prefix_tokens", 1)   # manifests written before it was recorded: the CLS
    for v in manifest["variants"]:
        k, fp16 = v["keep_tokens"], v.get("tail_fp16") is not None
        tail = v["tail_fp16"] if fp16 else v["tail"]
        name = model_name(k)
        d = repo / name
        (d / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(export_dir / tail["file"], d / "1" / "model.onnx")
        (d / "config.pbtxt").write_text(TEMPLATE.format(
            name=name, max_batch=max_batch, tokens_name="tokens", tokens_type="TYPE_FP16" if fp16 else "TYPE_FP32",
            t=p + k, d=manifest["dim"], k=k, c=manifest["num_classes"], delay_us=delay_us,
            model_id=manifest["model_id"]))
        for c in v.get("codecs") or []:
            name = model_name(k, c["name"])
            d = repo / name
            (d / "1").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(export_dir / c["tail"]["file"], d / "1" / "model.onnx")
            (d / "config.pbtxt").write_text(TEMPLATE.format(
                name=name, max_batch=max_batch, tokens_name="codes", tokens_type="TYPE_UINT8",
                t=p + k, d=c["dims"], k=k, c=manifest["num_classes"], delay_us=delay_us,
                model_id=manifest["model_id"]) + CODEC_PARAMETER.format(codec_id=c["codec_id"]))
    return repo


def model_config_pb2():
    """Triton's ModelConfig protobuf module. tritonclient ships it in tritonclient/grpc, whose
    package __init__ refuses to import without the grpc extra, so load the file directly."""
    import importlib.util

    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(path: str | Path):
    """config.pbtxt -> ModelConfig message (raises on anything Triton's schema rejects)."""
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    return text_format.Parse(Path(path).read_text(), pb2.ModelConfig())
