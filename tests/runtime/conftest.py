"""Runtime fixtures. STAND-IN: until mercury_onnx.export lands, build a tiny export folder
from the reference model by hand, following docs/FORMAT.md (to be replaced by `ref_export`)."""
from __future__ import annotations

import hashlib
import json

import pytest


def _build_standin(ref_json, out):
    import torch
    from mercury_onnx.export.manifest import sha256_file
    from mercury_onnx.models.checkpoint import mercury_from_any

    m = mercury_from_any(str(ref_json), keep_ratios=[0.25])[0]

    class Head(torch.nn.Module):
        def __init__(s): super().__init__(); s.m = m
        def forward(s, x): return s.m.forward_head(x)

    class Tail(torch.nn.Module):
        def __init__(s): super().__init__(); s.m = m
        def forward(s, t, i): return s.m.forward_tail(t, i)

    class Full(torch.nn.Module):
        def __init__(s): super().__init__(); s.b = m.backbone
        def forward(s, x): return s.b(x)

    x = torch.randn(2, 3, 32, 32)
    tok, idx = m.forward_head(x)
    kw = dict(opset_version=17, dynamo=False)
    b = {0: "batch"}
    torch.onnx.export(Head(), (x,), out / "head_k16.onnx", input_names=["images"],
                      output_names=["tokens", "indices"], dynamic_axes=dict(images=b, tokens=b, indices=b), **kw)
    torch.onnx.export(Tail(), (tok, idx), out / "tail_k16.onnx", input_names=["tokens", "indices"],
                      output_names=["logits"], dynamic_axes=dict(tokens=b, indices=b, logits=b), **kw)
    torch.onnx.export(Full(), (x,), out / "full.onnx", input_names=["images"], output_names=["logits"],
                      dynamic_axes=dict(images=b, logits=b), **kw)
    files = {f: sha256_file(out / f) for f in ("full.onnx", "head_k16.onnx", "tail_k16.onnx")}
    cfg = m.cfg
    manifest = {
        "format": "mercury-export/1",
        "model_id": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
        "timm_model": cfg.timm_model, "overrides": cfg.overrides,
        "num_patches": m.num_patches, "dim": m.dim, "grid": m.grid, "depth": m.depth,
        "prune_after_block": 1, "split_after_block": 1, "opset": 17,
        "preprocess": {"mean": cfg.mean, "std": cfg.std, "size": [32, 32]},
        "classes": cfg.classes, "full": {"file": "full.onnx"},
        "variants": [{"keep_ratio": 0.25, "keep_tokens": 16,
                      "head": {"file": "head_k16.onnx", "dtype": "float32"},
                      "head_int8": None, "head_tok8": None,
                      "tail": {"file": "tail_k16.onnx", "io_dtype": "float32"}, "tail_fp16": None}],
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


@pytest.fixture(scope="session")
def export_dir(ref_json, tmp_path_factory):
    return _build_standin(ref_json, tmp_path_factory.mktemp("export"))
