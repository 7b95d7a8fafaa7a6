"""benchmarks/prune_point.py's head profile: kernel_parts puts every kernel of onnxruntime's
optimised head graphs in the part of the head it computes, and trained_like gives a random
backbone the graph a trained checkpoint exports. On the reference checkpoint's two heads."""
from __future__ import annotations

import importlib.util
import sys
from collections import Counter

import onnx
import pytest
import torch

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("prune_point", ROOT / "benchmarks" / "prune_point.py")
prune_point = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prune_point)

WEIGHT_OPS = {"Conv", "Gemm", "MatMul", "FusedMatMul"}


def _export_heads(source, tmp_path):
    from mercury_onnx.export import graphs as G
    from mercury_onnx.export.convert import export_onnx

    block, attn, x = prune_point.both_points(str(source), 0.25)
    files = {}
    for name, m in (("block", block), ("attn", attn)):
        files[name] = tmp_path / f"{name}.onnx"
        export_onnx(G.HeadGraph(m), (x,), files[name], ["images"], ["tokens", "indices"])
    return files


def _matmul_parts(path):
    parts = prune_point.kernel_parts(path)
    nodes = onnx.load(path.with_suffix(".opt.onnx")).graph.node
    return Counter(parts[n.name] for n in nodes if n.op_type in WEIGHT_OPS), parts


def test_kernel_parts_of_both_heads(ref_json, tmp_path):
    files = _export_heads(ref_json, tmp_path)
    block, block_parts = _matmul_parts(files["block"])
    attn, attn_parts = _matmul_parts(files["attn"])
    # patch embedding (Conv); qkv, q k^T, (softmax) v, proj; fc1, fc2; the similarity score's 2 MatMuls
    assert block == {"embedding": 1, "attention": 4, "MLP": 2, "selection, glue": 2}
    assert attn == {**block, "score proxy": 2}                   # + the proxy's two thin MatMuls
    for parts in (block_parts, attn_parts):
        assert set(parts.values()) <= set(prune_point.PARTS)
        assert parts[next(k for k in parts if "Softmax" in k)] == "attention"
        assert parts[next(k for k in parts if "TopK" in k)] == "selection, glue"


def test_head_parts_sum_to_the_profiled_total(ref_json, tmp_path):
    import numpy as np

    files = _export_heads(ref_json, tmp_path)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    p = prune_point.head_parts(files["attn"], x, runs=5)
    assert list(p) == [*prune_point.PARTS, "total"]
    assert all(v > 0 for v in p.values())
    assert p["total"] == pytest.approx(sum(p[k] for k in prune_point.PARTS), abs=0.3)


def test_trained_like_keeps_the_bias_adds(tmp_path):
    """timm's random init has zero biases, which the exporter drops (a Linear becomes a bare
    MatMul); trained_like makes them non-zero, so the Linears export as a trained checkpoint's do."""
    from export_latency import trained_like

    from mercury_onnx.export import graphs as G
    from mercury_onnx.export.convert import export_onnx
    from mercury_onnx.models.checkpoint import mercury_from_any

    ops = {}
    for kind in ("timm init", "trained-like"):
        m = mercury_from_any("deit_tiny_patch16_224", keep_ratios=[0.25])[0]
        if kind == "trained-like":
            trained_like(m)
        x = torch.randn(1, 3, 224, 224)
        export_onnx(G.HeadGraph(m), (x,), tmp_path / "h.onnx", ["images"], ["tokens", "indices"])
        ops[kind] = Counter(n.op_type for n in onnx.load(tmp_path / "h.onnx").graph.node)
    assert ops["timm init"]["Gemm"] < ops["trained-like"]["Gemm"]      # qkv, proj, fc1, fc2 keep their bias
    assert ops["trained-like"]["Gemm"] == 4
