"""A codec export for the runtime tests, built from the reference export without the exporter.

Wraps the reference export's fp32 head and tail ONNX graphs with the codec contract of
docs/FORMAT.md (the head ends in `codes` uint8 (B, 1+K, d), the tail starts from them): a
PCA basis fitted on the head's tokens of real CIFAR-10 *train* images, uniform b-bit codes
with calibrated ranges, a zstd dictionary trained on train payloads. The runtime (client,
serve-tail, bench) only sees files and a manifest, so it is tested against the contract
here; the exporter's own codec graphs (export --codec) are tested where they are built.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mercury_onnx.export.images import load_images
from mercury_onnx.formats.manifest import load_manifest, sha256_file
from mercury_onnx.formats import codec_wire
from mercury_onnx.runtime.head import Head


def _const(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _head_graph(src: Path, dst: Path, mean, basis, lo, step, levels):
    m = onnx.load(src)
    g = m.graph
    for o in g.output:
        if o.name == "tokens":
            o.name = "codes"
            o.type.tensor_type.elem_type = TensorProto.UINT8
            o.type.tensor_type.shape.dim[2].dim_value = basis.shape[1]
    g.initializer.extend([_const("cw_mean", mean), _const("cw_basis", basis), _const("cw_lo", lo),
                          _const("cw_step", step), _const("cw_zero", 0.0), _const("cw_max", levels)])
    for n in g.node:                                   # the old output becomes internal
        n.output[:] = ["cw_tokens" if x == "tokens" else x for x in n.output]
    g.node.extend([helper.make_node("Sub", ["cw_tokens", "cw_mean"], ["cw_c"]),
                   helper.make_node("MatMul", ["cw_c", "cw_basis"], ["cw_y"]),         # (B, 1+K, d)
                   helper.make_node("Sub", ["cw_y", "cw_lo"], ["cw_y0"]),
                   helper.make_node("Div", ["cw_y0", "cw_step"], ["cw_s"]),
                   helper.make_node("Round", ["cw_s"], ["cw_r"]),
                   helper.make_node("Clip", ["cw_r", "cw_zero", "cw_max"], ["cw_q"]),
                   helper.make_node("Cast", ["cw_q"], ["codes"], to=TensorProto.UINT8)])
    onnx.save(m, dst)


def _tail_graph(src: Path, dst: Path, mean, basis, lo, step):
    m = onnx.load(src)
    g = m.graph
    for i in g.input:
        if i.name == "tokens":
            i.name = "codes"
            i.type.tensor_type.elem_type = TensorProto.UINT8
            i.type.tensor_type.shape.dim[2].dim_value = basis.shape[1]
    for n in g.node:
        n.input[:] = ["cw_tokens" if x == "tokens" else x for x in n.input]
    g.initializer.extend([_const("cw_mean", mean), _const("cw_basis_t", basis.T), _const("cw_lo", lo),
                          _const("cw_step", step)])
    g.node.insert(0, helper.make_node("Cast", ["codes"], ["cw_f"], to=TensorProto.FLOAT))
    g.node.insert(1, helper.make_node("Mul", ["cw_f", "cw_step"], ["cw_s"]))
    g.node.insert(2, helper.make_node("Add", ["cw_s", "cw_lo"], ["cw_y"]))
    g.node.insert(3, helper.make_node("MatMul", ["cw_y", "cw_basis_t"], ["cw_x"]))
    g.node.insert(4, helper.make_node("Add", ["cw_x", "cw_mean"], ["cw_tokens"]))
    onnx.save(m, dst)


def add_codec(export_dir: Path, out_dir: Path, train_dir: Path, codecs=((16, 4),), dictionary=True,
              images: int = 256) -> Path:
    """Copy export_dir to out_dir with codec heads/tails for every (d, b), every variant."""
    shutil.copytree(export_dir, out_dir)
    man = load_manifest(out_dir)
    x, _ = load_images(train_dir, images, tuple(man["preprocess"]["size"]), man["preprocess"]["mean"],
                       man["preprocess"]["std"])
    files = list(man["files"])
    for v in man["variants"]:
        tokens = Head(out_dir, v["keep_ratio"], manifest=man)(x)["tokens"]               # (M, 1+K, D)
        flat = tokens.reshape(-1, tokens.shape[-1])
        mean = flat.mean(0)
        _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
        v["codecs"] = []
        for d, b in codecs:
            basis = vt[:d].T.astype(np.float32)                                          # (D, d)
            y = (flat - mean) @ basis
            lo, hi = np.percentile(y, 0.1, 0), np.percentile(y, 99.9, 0)
            step = (hi - lo) / (2 ** b - 1)
            k, name = v["keep_tokens"], f"{d}x{b}"
            head, tail = f"head_k{k}_c{name}.onnx", f"tail_k{k}_c{name}.onnx"
            _head_graph(out_dir / v["head"]["file"], out_dir / head, mean, basis, lo, step, 2 ** b - 1)
            _tail_graph(out_dir / v["tail"]["file"], out_dir / tail, mean, basis, lo, step)
            basis_sha = hashlib.sha256(basis.tobytes()).hexdigest()
            dic = None
            if dictionary:
                codes = ort.InferenceSession(str(out_dir / head), providers=["CPUExecutionProvider"]).run(
                    ["codes"], {"images": x})[0]
                data = codec_wire.train_dictionary(codes, b)
                dic = {"file": f"codec_k{k}_{name}.zdict", "sha256": hashlib.sha256(data).hexdigest()}
                (out_dir / dic["file"]).write_bytes(data)
                files.append(dic["file"])
            v["codecs"].append({
                "name": name, "dims": d, "bits": b, "head": {"file": head}, "tail": {"file": tail},
                "codec_id": codec_wire.codec_id(man["model_id"], d, b, basis_sha, dic and dic["sha256"]),
                "basis_sha256": basis_sha, "dictionary": dic,
                "variance_kept": float((s[:d] ** 2).sum() / (s ** 2).sum())})
            files += [head, tail]
    man["files"] = {f: sha256_file(out_dir / f) for f in sorted(set(files))}
    (out_dir / "manifest.json").write_text(json.dumps(man, indent=1))
    return out_dir
