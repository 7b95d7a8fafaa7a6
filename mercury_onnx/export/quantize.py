"""Lower-precision graphs made from the validated fp32 ones.

- int8 head (ARM devices): onnxruntime.quantization, QDQ format, per-channel weights,
  static activation ranges from real calibration images. Both activation types are tried,
  S8S8 (int8 activations) and U8S8 (uint8 activations); the one whose end-to-end top-1
  agrees best with the fp32 head (ties: higher accuracy) on held-out real images is kept.
  Only the matmul-like ops are quantised (Conv, MatMul, Gemm): the pruning's scores, ArgMax,
  TopK and Gather stay float, so K and the index semantics are untouched.
- fp16 tail (CUDA): onnxconverter-common's float16 conversion. IO: `tokens` float16 in,
  `indices` int64, `logits` float32 out (the cast back is inside the graph).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

QUANT_OPS = ["Conv", "MatMul", "Gemm"]


class _Reader:
    """CalibrationDataReader over a numpy batch of real images."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self.feeds = iter([{"images": images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.feeds, None)


def _quantize(pre: Path, out: Path, images: np.ndarray, activation: str) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(pre), str(out), _Reader(images), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if activation == "S8S8" else QuantType.QUInt8,
                    op_types_to_quantize=QUANT_OPS)


def _split_logits(head: Path, tail, images: np.ndarray, threads: int) -> np.ndarray:
    from .validate import session

    h = session(head, threads)
    out = []
    for i in range(0, len(images), 32):
        tok, idx = h.run(None, {"images": images[i:i + 32]})
        out.append(tail.run(None, {"tokens": tok, "indices": idx})[0])
    return np.concatenate(out)


def quantize_head(fp32_head: Path, out: Path, tail: Path, calib: np.ndarray, select: np.ndarray,
                  labels: np.ndarray | None, threads: int = 1) -> dict:
    """Write the better of S8S8 / U8S8 to `out`; returns the manifest fields and the choice."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .validate import session

    tail_s = session(tail, threads)
    ref = _split_logits(fp32_head, tail_s, select, threads)
    scores = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        pre = td / "pre.onnx"
        quant_pre_process(str(fp32_head), str(pre), skip_symbolic_shape=False)
        for kind in ("S8S8", "U8S8"):
            _quantize(pre, td / f"{kind}.onnx", calib, kind)
            logits = _split_logits(td / f"{kind}.onnx", tail_s, select, threads)
            agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
            acc = None if labels is None else float((logits.argmax(-1) == labels).mean())
            scores[kind] = {"top1_agreement": round(agree, 4), "accuracy": acc and round(acc, 4)}
        best = max(scores, key=lambda k: (scores[k]["top1_agreement"], scores[k]["accuracy"] or 0))
        (td / f"{best}.onnx").replace(out)
    fp32_acc = None if labels is None else round(float((ref.argmax(-1) == labels).mean()), 4)
    return {"quant": best, "format": "QDQ", "per_channel": True, "ops": QUANT_OPS,
            "calibration_images": len(calib),
            "selection": {"images": len(select), "fp32_accuracy": fp32_acc, **scores}}


def tail_to_fp16(fp32_tail: Path, out: Path) -> None:
    """fp16 weights and compute; `tokens` input float16, `logits` output float32."""
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():   # "the float32 number 5e-08 will be truncated to 1e-07"
        warnings.simplefilter("ignore")
        model = float16.convert_float_to_float16(onnx.load(str(fp32_tail)), keep_io_types=True)
    tokens = next(i for i in model.graph.input if i.name == "tokens")
    tokens.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16   # its Cast to fp16 becomes a no-op
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
