"""The comparison rules of the ARM check (tools/arm64_run_heads.py compare), on x86 alone: two
runs' outputs that differ by known amounts must pass or fail exactly as documented."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mercury_onnx.formats.manifest import write_manifest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("arm64_run_heads", ROOT / "tools" / "arm64_run_heads.py")
heads = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heads)

B, K, D = 6, 4, 10  # images, kept tokens, width (= classes: the toy tail averages tokens into logits)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """An export folder whose tail is real ONNX: logits = mean over tokens (B, 1+K, D) -> (B, D)."""
    import onnx
    from onnx import TensorProto, helper

    out = tmp_path_factory.mktemp("toy_export")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["tokens"], ["logits"], axes=[1], keepdims=0)], "tail",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", 1 + K, D]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", D])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out / "tail_k4.onnx")
    variant = {"keep_ratio": 0.25, "keep_tokens": K, "head": {"file": "head_k4.onnx"},
               "head_int8": {"file": "head_k4_int8.onnx"}, "head_tok8": {"file": "head_k4_tok8.onnx"},
               "head_tok16": {"file": "head_k4_tok16.onnx"}, "tail": {"file": "tail_k4.onnx"}}
    write_manifest(out, {"model_id": "toy", "variants": [variant],
                         "validation": {"tolerances": {"min_top1_lossy": 0.9}}}, ["tail_k4.onnx"])
    return out


def outputs(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(16)[:K])[None].repeat(B, 0)  # (B, K)
    tok = rng.standard_normal((B, 1 + K, D)).astype(np.float32) * 8  # (B, 1+K, D)
    tok[np.arange(B), 1, np.arange(B)] += 40  # a clear winner class per image
    return {
        "k4/head/tokens": tok, "k4/head/indices": idx,
        "k4/head_int8/tokens": tok.copy(), "k4/head_int8/indices": idx.copy(),
        "k4/head_tok8/tokens": np.clip(np.round(tok / 0.4), -127, 127).astype(np.int8),
        "k4/head_tok8/scales": np.full((B, 1 + K, 1), 0.4, np.float32), "k4/head_tok8/indices": idx.copy(),
        "k4/head_tok16/tokens": tok.astype(np.float16), "k4/head_tok16/indices": idx.copy(),
    }


def compare(tmp_path, export, change=None, machine="aarch64", ort_arm="1.32.0", lenient=False) -> int:
    x86, arm = outputs(), outputs()
    if change:
        change(arm)
    facts = {"model_id": "toy", "images": B, "runs": [{"seconds": 1.0}], "total_seconds": 1.0}
    np.savez(tmp_path / "x.npz", __facts__=np.array(json.dumps({**facts, "machine": "x86_64",
                                                                 "onnxruntime": "1.32.0"})), **x86)
    np.savez(tmp_path / "a.npz", __facts__=np.array(json.dumps({**facts, "machine": machine,
                                                                 "onnxruntime": ort_arm})), **arm)
    return heads.compare(tmp_path / "x.npz", tmp_path / "a.npz", export, lenient)


def add(key, delta, where=(0, 1, 2)):
    def change(arm):
        arm[key][where[:arm[key].ndim]] += delta
    return change


def test_identical_runs_pass(tmp_path, export, capsys):
    assert compare(tmp_path, export) == 0
    assert "PASS: 4 head graph(s) agree" in capsys.readouterr().out


@pytest.mark.parametrize("change, rc", [
    (add("k4/head/tokens", np.float32(5e-5)), 0),
    (add("k4/head/tokens", np.float32(2e-4)), 1),
    (add("k4/head/indices", 1), 1),
    (add("k4/head_tok8/tokens", np.int8(1)), 0),
    (add("k4/head_tok8/tokens", np.int8(2)), 1),
    (add("k4/head_tok8/scales", np.float32(1e-5), where=(0, 1, 0)), 1),
    (add("k4/head_tok8/indices", 1), 1),
    (add("k4/head_tok16/tokens", np.float16(0.004), where=(0, 1, 0)), 0),  # 40-ish: ulp 0.03125
    (add("k4/head_tok16/tokens", np.float16(0.1), where=(0, 1, 0)), 1),  # 3 ulps
    (add("k4/head_int8/indices", 1), 1),  # int8 heads must select equal indices too
    (add("k4/head_int8/tokens", np.float32(500), where=(slice(0, 2), 1, 9)), 1),  # top-1 moves on 2/6 images
], ids=["fp32-5e-5", "fp32-2e-4", "fp32-index", "tok8-1step", "tok8-2steps", "tok8-scale", "tok8-index",
        "tok16-1ulp", "tok16-3ulp", "int8-index", "int8-top1"])
def test_rules(tmp_path, export, change, rc):
    assert compare(tmp_path, export, change) == rc


def test_int8_index_swap_fails_unless_lenient(tmp_path, export, capsys):
    assert compare(tmp_path, export, add("k4/head_int8/indices", 1)) == 1
    assert "head_int8 indices" in capsys.readouterr().out.split("FAIL:")[-1]
    # lenient (older S8S8 exports): the swap is reported, the end-to-end top-1 still gates
    assert compare(tmp_path, export, add("k4/head_int8/indices", 1), lenient=True) == 0
    assert "1 of 6 rows differ" in capsys.readouterr().out
    move_top1 = add("k4/head_int8/tokens", np.float32(500), where=(slice(0, 2), 1, 9))
    assert compare(tmp_path, export, move_top1, lenient=True) == 1


def test_not_aarch64_or_other_version_fails(tmp_path, export):
    assert compare(tmp_path, export, machine="x86_64") == 1
    assert compare(tmp_path, export, ort_arm="1.31.0") == 1


def test_a_head_graph_missing_from_the_arm_run_fails(tmp_path, export):
    def drop_tok16(arm):
        for k in [k for k in arm if k.startswith("k4/head_tok16/")]:
            del arm[k]
    assert compare(tmp_path, export, drop_tok16) == 1
