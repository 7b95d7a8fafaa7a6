"""Lower-precision graphs made from the validated fp32 ones.

- int8 head (ARM devices): onnxruntime.quantization, QDQ format, static activation ranges
  from real calibration images. Recipe: U8S8 (uint8 activations, int8 weights) with
  reduce_range (7-bit weights), so the head computes the same integers on the x86 machine that
  exports and validates it and on the Pi (aarch64) that runs it:
  * S8S8 (int8 activations) fuses differently per platform: onnxruntime fuses int8-activation
    Conv / Softmax / MatMul into integer kernels (QLinearConv, QLinearSoftmax, QLinearMatMul)
    only on ARM; on x86 they run as float math on dequantised values. Same model, other
    arithmetic, and other tokens selected on aarch64 (docs/RESULTS.md, ARM64).
  * U8S8 fuses the same way on both, but x86 AVX2 without VNNI multiplies u8 x s8 pairs with
    vpmaddubsw, whose int16 pair sums saturate with 8-bit weights (measured:
    git history of docs/results/edge.md). With 7-bit weights a pair sum
    is at most 2 * 255 * 64 < 2^15: no saturation, as the onnxruntime docs advise for x86
    without VNNI. The ARM kernels are exact either way.
  * Only the nodes with weights are quantised (the patch embedding's Conv, the qkv / proj /
    fc1 / fc2 Gemms). Attention's activation x activation MatMuls (so its Softmax) and the
    pruning's scoring stay float: with them in int8, one LayerNorm output that rounds to
    another int8 step on ARM (onnxruntime's LayerNorm differs by a few ulps between the two
    builds) moves the CLS attention by a whole step and can swap a near-tied token; in float
    the move is small and continuous.
  Per-channel and per-tensor weight scales are both tried; the one whose end-to-end top-1
  agrees best with the fp32 head (ties: higher accuracy) on held-out real images is kept.
  Every node that only ranks tokens (ancestors of the GatherND index, not of its data: the
  scoring MatMuls included) stays float, so K and the index semantics are untouched.
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


def _activation_only_nodes(pre: Path) -> list[str]:
    """Names every node of `pre` (in place: nodes_to_exclude goes by name) and returns the
    matmul-like nodes that stay float: those without weights (attention's QK^T and attn V) and
    the pruning's scoring."""
    model = onnx.load(str(pre))
    for i, n in enumerate(model.graph.node):
        n.name = n.name or f"{n.op_type}_unnamed_{i}"
    onnx.save(model, str(pre))
    weights = {t.name for t in model.graph.initializer}
    ranking = {n.name for n in selection_only(model.graph)}
    return [n.name for n in model.graph.node
            if n.op_type in QUANT_OPS and (not weights & set(n.input) or n.name in ranking)]


def selection_only(graph) -> list:
    """The nodes that only decide which tokens are kept: ancestors of a GatherND's index that
    are not ancestors of any GatherND's data. The scoring's MatMul by a constant (1, T) weight
    is one; int8 would blur the near-ties the ranking turns on, for no speed (it is tiny)."""
    producer = {o: n for n in graph.node for o in n.output}

    def ancestors(names) -> set[str]:   # nodes, by their first output (unique, names may be empty)
        seen, todo = set(), list(names)
        while todo:
            n = producer.get(todo.pop())
            if n is not None and n.output[0] not in seen:
                seen.add(n.output[0])
                todo += list(n.input)
        return seen

    gathers = [n for n in graph.node if n.op_type == "GatherND"]
    only = ancestors(n.input[1] for n in gathers) - ancestors(n.input[0] for n in gathers)
    return [n for n in graph.node if n.output[0] in only]


def _computes_after_gather(head: Path) -> bool:
    """Whether any node of the head consumes a GatherND's output (prune point "attn")."""
    graph = onnx.load(str(head), load_external_data=False).graph
    gathered = {o for n in graph.node if n.op_type == "GatherND" for o in n.output}
    return any(gathered & set(n.input) for n in graph.node)


def _quantize(pre: Path, out: Path, images: np.ndarray, per_channel: bool, exclude: list[str]) -> None:
    """U8S8, 7-bit weights, QDQ; the matmul-like nodes except `exclude`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(pre), str(out), _Reader(images), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                    per_channel=per_channel, op_types_to_quantize=QUANT_OPS, nodes_to_exclude=exclude)


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
    """Write the better of per-channel / per-tensor U8S8 (7-bit weights) to `out`; returns the
    manifest fields and the choice."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .validate import session

    tail_s = session(tail, threads)
    ref = _split_logits(fp32_head, tail_s, select, threads)
    scores = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        pre = td / "pre.onnx"
        # its symbolic shape inference gives GatherND(batch_dims=1) one axis too many, which ORT
        # repairs while optimising, with a scary "Error merging shape info" warning; the file it
        # writes carries the right shapes (onnx shape inference runs last), so silence that step
        # With prune point "attn" the block's MLP runs on the gathered tokens, and that extra
        # axis breaks the symbolic inference of everything after the GatherND (an untyped
        # value_info, an assertion in onnxruntime's tool): there only onnx's shape inference runs.
        import onnxruntime as ort
        ort.set_default_logger_severity(3)
        try:
            quant_pre_process(str(fp32_head), str(pre), skip_symbolic_shape=_computes_after_gather(fp32_head))
        finally:
            ort.set_default_logger_severity(2)
        exclude = _activation_only_nodes(pre)
        for kind in ("per_channel", "per_tensor"):
            _quantize(pre, td / f"{kind}.onnx", calib, kind == "per_channel", exclude)
            logits = _split_logits(td / f"{kind}.onnx", tail_s, select, threads)
            agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
            acc = None if labels is None else float((logits.argmax(-1) == labels).mean())
            scores[kind] = {"top1_agreement": round(agree, 4), "accuracy": acc and round(acc, 4)}
        best = max(scores, key=lambda k: (scores[k]["top1_agreement"], scores[k]["accuracy"] or 0))
        (td / f"{best}.onnx").replace(out)
    fp32_acc = None if labels is None else round(float((ref.argmax(-1) == labels).mean()), 4)
    return {"quant": "U8S8", "format": "QDQ", "reduce_range": True, "per_channel": best == "per_channel",
            "ops": QUANT_OPS,
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
