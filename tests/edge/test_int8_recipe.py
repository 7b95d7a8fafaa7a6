"""The int8 head's recipe (mercury_onnx/export/quantize.py) gives the same integer graph on the
x86 machine that validates it as on the Pi, on x86 alone (the arm64 marker's check runs the real
aarch64 build). onnxruntime fuses QDQ int8-activation ops into integer kernels only where
`session.qdqisint8allowed` holds (ARM by default): with it forced on, an x86 session builds the
graph an ARM one does (seen: the same fused op counts, and 0 of 64 index rows differing from the
emulated aarch64 run for an S8S8 head that differs in 13 by default)."""
from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from mercury_onnx.export.images import load_images
from mercury_onnx.export.quantize import selection_only


def fused(path, tmp_path, arm_fusion: bool) -> tuple[collections.Counter, ort.InferenceSession]:
    """The op counts of onnxruntime's optimised graph, and the session."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # serialisable, has the QDQ fusions
    so.optimized_model_filepath = str(tmp_path / f"opt_{int(arm_fusion)}.onnx")
    if arm_fusion:
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return ops, sess


def test_int8_head_runs_the_arm_graph_on_x86(int8_export, cifar_test, tmp_path):
    manifest = json.loads((int8_export / "manifest.json").read_text())
    v = next(v for v in manifest["variants"] if v.get("head_int8"))
    head = int8_export / v["head_int8"]["file"]
    x86_ops, x86 = fused(head, tmp_path, arm_fusion=False)
    arm_ops, arm = fused(head, tmp_path, arm_fusion=True)
    assert x86_ops == arm_ops
    # every node with weights runs as an integer kernel, none as float math on dequantised weights
    fp32 = onnx.load(str(int8_export / v["head"]["file"]))
    weights = {t.name for t in fp32.graph.initializer}
    ranking = {n.output[0] for n in selection_only(fp32.graph)}   # the scoring's constant-weight MatMul stays float
    weighted = sum(n.op_type in ("Conv", "MatMul", "Gemm") and bool(weights & set(n.input)) and n.output[0] not in ranking
                   for n in fp32.graph.node)
    assert x86_ops["QLinearConv"] + x86_ops["QGemm"] + x86_ops["QLinearMatMul"] == weighted > 0
    assert x86_ops["Conv"] == x86_ops["Gemm"] == 0
    pre = manifest["preprocess"]
    images, _ = load_images(cifar_test, 32, tuple(pre["size"]), pre["mean"], pre["std"])
    a, b = x86.run(None, {"images": images}), arm.run(None, {"images": images})
    for name, p, q in zip([o.name for o in x86.get_outputs()], a, b):
        assert np.array_equal(p, q), name


def test_int8_head_weights_cannot_saturate_avx2(int8_export):
    # x86 AVX2 without VNNI sums u8 x s8 pairs in int16 (vpmaddubsw): 2 * 255 * |w| must stay < 2^15
    manifest = json.loads((int8_export / "manifest.json").read_text())
    v = next(v for v in manifest["variants"] if v.get("head_int8"))
    assert v["head_int8"]["quant"] == "U8S8" and v["head_int8"]["reduce_range"]
    model = onnx.load(str(int8_export / v["head_int8"]["file"]))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(2 * 255 * int(np.abs(w.astype(np.int32)).max()) < 2 ** 15 for w in weights)
    zero_points = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"}  # activations
    types = {t.data_type for t in model.graph.initializer if t.name in zero_points}
    assert types == {onnx.TensorProto.UINT8}


def pruning_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes that score tokens for the pruning: downstream of the tensor the kept tokens are
    gathered from (the GatherND's data) and upstream of the TopK that ranks them."""
    consumers, producer = collections.defaultdict(list), {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)

    def walk(names, step):  # every tensor reachable from names
        seen, todo = set(), list(names)
        while todo:
            t = todo.pop()
            if t and t not in seen:
                seen.add(t)
                todo += step(t)
        return seen

    sources = {n.input[0] for n in model.graph.node if n.op_type == "GatherND"}
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    on_path = (walk(sources, lambda t: [o for n in consumers[t] for o in n.output]) - sources) \
        & walk([topk.input[0]], lambda t: list(producer[t].input) if t in producer else [])
    return [n for n in model.graph.node if n.output[0] in on_path]


def test_int8_head_keeps_scoring_and_attention_in_float(int8_export):
    # only nodes with weights are int8: the pruning's scores and attention's MatMuls/Softmax are float
    manifest = json.loads((int8_export / "manifest.json").read_text())
    v = next(v for v in manifest["variants"] if v.get("head_int8"))
    model = onnx.load(str(int8_export / v["head_int8"]["file"]))
    scoring = pruning_nodes(model)
    ops = {n.op_type for n in scoring}
    assert "TopK" not in ops and len(scoring) > 5  # found the scoring subgraph, up to TopK's input
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name for t in model.graph.initializer}
    dq_weights = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    attention = [n for n in model.graph.node if n.op_type == "MatMul" and n not in scoring and not dq_weights & set(n.input)]
    assert len(attention) >= 2  # QK^T and attn V of each block
    assert all(producer[i].op_type != "DequantizeLinear" for n in attention for i in n.input)


def test_eval_onnx_scores_the_int8_head(int8_export, cifar_test):
    """`eval --onnx` gives the QDQ int8 head its own row (the accuracy delta vs fp32 that the
    export issue asks for), run through the same tail as the fp32 head."""
    from mercury_onnx.calib.data import Preprocess, load_image_set
    from mercury_onnx.calib.onnx_eval import evaluate_onnx

    manifest = json.loads((int8_export / "manifest.json").read_text())
    v = next(v for v in manifest["variants"] if v.get("head_int8"))
    pre = manifest["preprocess"]
    images, _ = load_image_set(cifar_test, Preprocess(tuple(pre["size"]), pre["mean"], pre["std"]),
                               count=64, progress=False)
    rows = evaluate_onnx(int8_export, images, [v["keep_ratio"]], progress=False)
    top1 = {(r["method"], r.get("token_dtype")): r["top1"] for r in rows}
    assert ("mercury-int8-head", None) in top1 and ("mercury", None) in top1
    # stated delta: within 4 images of 64 of the fp32 head on real images
    assert abs(top1[("mercury-int8-head", None)] - top1[("mercury", None)]) <= 4 / 64
