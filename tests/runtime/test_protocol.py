"""runtime/protocol.py in process, without a server: what any engine (serve-tail, Ray Serve)
gets from it. Real tokens from the ORT head on CIFAR-10 test images."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mercury_onnx.formats.images import preprocess
from mercury_onnx.formats.manifest import ManifestError, load_manifest
from mercury_onnx.runtime import codec
from mercury_onnx.runtime import protocol as P
from mercury_onnx.runtime.client import build_request, parse_response
from mercury_onnx.runtime.head import Head


@pytest.fixture(scope="module")
def setup(export_dir, cifar_test):
    models = P.served_models(export_dir, [0.25])
    model = models["mercury_tail_k16"]
    manifest = load_manifest(export_dir)
    images = sorted(cifar_test.glob("*/0002.jpg"))[:6]
    out = Head(export_dir, 0.25, manifest=manifest)(preprocess(images, manifest["preprocess"]))
    return dict(model=model, tail=model.load_tail("cpu"), tokens=out["tokens"], indices=out["indices"])


def _headers(hlen):
    return {P.HEADER_LENGTH: str(hlen)}


def test_model_table_follows_the_manifest(export_dir):
    models = P.served_models(export_dir)
    assert sorted(models) == ["mercury_tail_k16", "mercury_tail_k32"]
    m = models["mercury_tail_k32"]
    manifest = load_manifest(export_dir)
    assert (m.keep, m.dim, m.num_patches, m.model_id) == (32, 192, 64, manifest["model_id"])
    meta = m.metadata()
    assert meta["inputs"][0]["shape"] == [-1, 33, 192] and meta["outputs"][0]["shape"] == [-1, 10]
    assert list(P.served_models(export_dir, [0.5])) == ["mercury_tail_k32"]
    with pytest.raises(ManifestError, match="no float16 tail"):
        P.served_models(export_dir, tail_dtype="float16")
    with pytest.raises(ManifestError, match="no export for keep ratio"):
        P.served_models(export_dir, [0.7])


@pytest.mark.parametrize("binary_output", [True, False])
def test_decode_run_encode_matches_the_tail(setup, binary_output):
    m, tail = setup["model"], setup["tail"]
    body, hlen = build_request({"tokens": setup["tokens"], "indices": setup["indices"]},
                               {"model_id": m.model_id}, binary_output=binary_output)
    req = P.decode_request(m, _headers(hlen), body)
    assert req.tokens.dtype == np.float32 and req.indices.dtype == np.int64 and req.size == 6
    (logits,) = P.run_batch(tail, [req])
    out, headers = P.encode_response(m, req, logits, {"tail_ms": 1.0})
    resp, outputs = parse_response(out, headers.get("Inference-Header-Content-Length"))
    assert headers["content-type"] == ("application/octet-stream" if binary_output else P.JSON_TYPE)
    assert resp["model_name"] == m.name and resp["parameters"] == {"tail_ms": 1.0, "model_id": m.model_id}
    np.testing.assert_array_equal(outputs["logits"], tail(setup["tokens"], setup["indices"]))


def test_json_inputs_and_request_id(setup):
    m = setup["model"]
    tok, idx = setup["tokens"][:1], setup["indices"][:1]
    body = json.dumps({"id": "r7", "parameters": {"model_id": m.model_id},
                       "inputs": [{"name": "tokens", "datatype": "FP32", "shape": list(tok.shape),
                                   "data": tok.ravel().tolist()},
                                  {"name": "indices", "datatype": "INT32", "shape": list(idx.shape),
                                   "data": idx.ravel().tolist()}]}).encode()
    req = P.decode_request(m, {}, body)
    np.testing.assert_array_equal(req.tokens, tok)
    np.testing.assert_array_equal(req.indices, idx)
    assert not req.binary_output
    out, _ = P.encode_response(m, req, np.zeros((1, 10), np.float32))
    assert json.loads(out)["id"] == "r7"


def test_compact_tokens_are_dequantised(setup):
    m = setup["model"]
    p = codec.pack(setup["tokens"], setup["indices"], m.num_patches, "int8")
    body, hlen = build_request({"tokens": p.tokens, "indices": p.indices, "scales": p.scales},
                               {"model_id": m.model_id})
    req = P.decode_request(m, _headers(hlen), body)
    tokens, indices = codec.unpack(p)
    np.testing.assert_array_equal(req.tokens, tokens)
    np.testing.assert_array_equal(req.indices, indices)


def test_run_batch_splits_back_what_each_request_would_get_alone(setup):
    m, tail, tok, idx = setup["model"], setup["tail"], setup["tokens"], setup["indices"]
    reqs = []
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):            # batches of 1, 3 and 2 images
        body, hlen = build_request({"tokens": tok[sl], "indices": idx[sl]}, {"model_id": m.model_id})
        reqs.append(P.decode_request(m, _headers(hlen), body))
    outs = P.run_batch(tail, reqs)
    assert [o.shape for o in outs] == [(1, 10), (3, 10), (2, 10)]
    for sl, o in zip((slice(0, 1), slice(1, 4), slice(4, 6)), outs):
        np.testing.assert_allclose(o, tail(tok[sl], idx[sl]), rtol=1e-5, atol=1e-5)


def _refused(status, match, fn, *args):
    with pytest.raises(P.RequestError, match=match) as e:
        fn(*args)
    assert e.value.status == status
    return e.value


def test_refusals_carry_status_reason_and_headers(setup):
    m = setup["model"]
    models = {m.name: m}
    e = _refused(401, "missing bearer", P.authorize, {}, "tok")
    assert e.reason == "auth" and e.headers == {"WWW-Authenticate": "Bearer"}
    _refused(401, "invalid bearer", P.authorize, {"authorization": "Bearer nope"}, "tok")
    P.authorize({"authorization": "Bearer tok"}, "tok")
    P.authorize({}, None)
    assert _refused(404, "unknown model", P.lookup, models, "mercury_tail_k9").reason == "unknown_model"
    _refused(404, "version 2", P.lookup, models, m.name, "2")
    assert P.lookup(models, m.name) is m
    assert _refused(413, "exceeds", P.check_content_length, {"content-length": "101"}, 100).reason == "too_large"
    _refused(400, "bad Content-Length", P.check_content_length, {"content-length": "-1"}, 100)
    _refused(413, "exceeds", P.check_body_size, 101, 100)
    body, hlen = build_request({"tokens": setup["tokens"][:1], "indices": setup["indices"][:1]},
                               {"model_id": "0" * 16})
    e = _refused(409, "does not match", P.decode_request, m, _headers(hlen), body)
    assert e.reason == "bad_request"
    _refused(400, "Inference-Header-Content-Length", P.decode_request, m, _headers(len(body) + 1), body)


def test_protocol_imports_no_torch_and_no_web_framework():
    code = ("import sys; import mercury_onnx.runtime.protocol; "
            "print([m for m in ('torch', 'timm', 'onnx', 'starlette', 'fastapi', 'uvicorn') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
