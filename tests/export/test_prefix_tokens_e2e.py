"""A distilled DeiT (2 prefix tokens: CLS + distillation) end to end, random weights: export +
validation on real CIFAR-10 images, ORT vs torch, serve-tail, and `infer` through the server.
And a register ViT (CLS + 4 registers) through export + validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.export import export_model
from mercury_onnx.formats.manifest import load_manifest
from mercury_onnx.models.checkpoint import mercury_from_any, save_mercury
from mercury_onnx.runtime import codec
from mercury_onnx.runtime.client import Client
from mercury_onnx.runtime.head import Head
from mercury_onnx.formats.images import preprocess
from mercury_onnx.runtime.server import spawn
from mercury_onnx.runtime.tail import Tail

DISTILLED = "deit_tiny_distilled_patch16_224"


@pytest.fixture(scope="module")
def distilled_export(tmp_path_factory, cifar_test):
    d = tmp_path_factory.mktemp("distilled")
    _, ckpt = save_mercury(d / "ck", mercury_from_any(DISTILLED, keep_ratios=[0.25]))
    return ckpt, export_model(ckpt, d / "e", [0.25], validate_data=cifar_test, validate_images=4, log=None)


@pytest.fixture(scope="module")
def images(cifar_test):
    return sorted(cifar_test.glob("*/0002.jpg"))[:3]


def test_distilled_export_validates_and_matches_torch(distilled_export, images):
    ckpt, out = distilled_export
    m = load_manifest(out)
    assert m["num_prefix_tokens"] == 2 and m["num_patches"] == 196 and m["validation"]["passed"]
    v = m["variants"][0]
    assert v["keep_tokens"] == 49 and m["validation"]["identical_index_rows"]["head_k49.onnx.indices"] == 1.0
    x = preprocess(images, m["preprocess"])
    head = Head(out, manifest=m)(x)
    assert head["tokens"].shape == (3, 2 + 49, 192) and head["indices"].shape == (3, 49)
    (model,) = mercury_from_any(str(ckpt), keep_ratios=[0.25])
    with torch.no_grad():
        tok_t, idx_t = model.forward_head(torch.from_numpy(x))
        full = model.backbone.blocks[0](model.embed(torch.from_numpy(x)))
        logits_t = model.forward_tail(tok_t, idx_t).numpy()
    assert np.array_equal(head["indices"], idx_t.numpy())
    np.testing.assert_allclose(head["tokens"][:, :2], full[:, :2].numpy(), atol=1e-4)   # CLS + dist, first
    logits = Tail(out, provider="cpu", manifest=m)(head["tokens"], head["indices"])
    np.testing.assert_allclose(logits, logits_t, atol=1e-4 * max(1, np.abs(logits_t).max()))


def test_distilled_payload_round_trip(distilled_export, images):
    _, out = distilled_export
    m = load_manifest(out)
    head = Head(out, manifest=m)(preprocess(images, m["preprocess"]))
    data = codec.encode(head["tokens"], head["indices"], model_id=m["model_id"], keep_ratio=0.25,
                        num_patches=196, token_dtype="fp16")
    h, tokens, indices = codec.decode(data, expect_model_id=m["model_id"])
    assert (h.version, h.num_prefix_tokens, h.keep) == (2, 2, 49) and tokens.shape == (3, 51, 192)
    assert np.array_equal(indices, head["indices"])


def test_distilled_serve_tail_and_infer_round_trip(distilled_export, images):
    _, out = distilled_export
    m = load_manifest(out)
    proc, url = spawn(out, "--provider", "cpu")
    try:
        for token_dtype in ("fp32", "int8"):
            client = Client(out, url, token_dtype=token_dtype, fallback="none", timeout=30)
            preds = client.predict(images)
            client.close()
            assert [p.where for p in preds] == ["split"] * 3
            head = Head(out, manifest=m)(preprocess(images, m["preprocess"]))
            local = Tail(out, provider="cpu", manifest=m)(head["tokens"], head["indices"])
            got = np.stack([p.logits for p in preds])
            np.testing.assert_allclose(got, local, atol=1e-4 if token_dtype == "fp32" else 0.05)
        r = CliRunner().invoke(app, ["infer", *map(str, images), "--export", str(out), "--server", url,
                                     "--fallback", "none", "--timeout", "30"])
        assert r.exit_code == 0, r.output
        assert "fallback" not in r.output and "round trip" in r.output and "bytes sent" in r.output
    finally:
        proc.terminate()
        proc.wait(10)


def test_register_vit_exports_and_validates(tmp_path, cifar_test):
    kw = dict(overrides=dict(img_size=56, depth=2, num_classes=10))
    _, ckpt = save_mercury(tmp_path / "ck", mercury_from_any("vit_small_patch14_reg4_dinov2", keep_ratios=[0.5], **kw))
    out = export_model(ckpt, tmp_path / "e", [0.5], validate_data=cifar_test, validate_images=16, log=None)
    m = load_manifest(out)
    assert m["num_prefix_tokens"] == 5 and m["grid"] == 4 and m["validation"]["passed"]
    assert Head(out, manifest=m)(preprocess(sorted(cifar_test.glob("*/0003.jpg"))[:2], m["preprocess"]))[
        "tokens"].shape == (2, 5 + 8, 384)
