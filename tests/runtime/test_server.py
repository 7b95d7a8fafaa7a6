"""serve-tail end to end, in a subprocess on 127.0.0.1: tritonclient parity (binary + JSON),
bad requests (4xx, server stays ready), 32 concurrent clients with dynamic batching.
Each test that takes `served` runs against both engines: the standalone server, and
--engine ray with 2 replicas per keep ratio on a local Ray cluster (marked `ray`)."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest

from mercury_onnx.formats.manifest import load_manifest
from mercury_onnx.runtime import codec
from mercury_onnx.runtime.client import build_request, parse_response
from mercury_onnx.runtime.head import Head
from mercury_onnx.formats.images import preprocess
from mercury_onnx.runtime.server import spawn
from mercury_onnx.runtime.tail import Tail, model_name

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["standalone", pytest.param("ray", marks=pytest.mark.ray)])
def served(request, export_dir):
    args = ("--auth-token", TOKEN, "--max-body-mb", "1", "--max-delay-ms", "5", "--provider", "cpu")
    if request.param == "ray":   # 2 keep ratios x 2 replicas x 0.5 CPU: the cluster's 2 logical CPUs
        from .conftest import spawn_ray

        proc, url = spawn_ray(export_dir, request.getfixturevalue("ray_cluster"), *args,
                              "--replicas", "2", "--num-cpus", "0.5", "--threads", "1")
    else:
        proc, url = spawn(export_dir, *args)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def ref(export_dir, cifar_test):
    """Real tokens: 4 CIFAR-10 test images through the ORT head, and the local ORT tail's logits."""
    manifest = load_manifest(export_dir)
    images = sorted(cifar_test.glob("*/0000.jpg"))[:4]
    out = Head(export_dir, manifest=manifest)(preprocess(images, manifest["preprocess"]))
    tail = Tail(export_dir, provider="cpu", manifest=manifest)
    return dict(manifest=manifest, model=model_name(tail.keep), tokens=out["tokens"],
                indices=out["indices"], logits=tail(out["tokens"], out["indices"]), tail=tail)


def post(url, model, body, hlen=None, headers=AUTH):
    h = dict(headers)
    if hlen is not None:
        h["Inference-Header-Content-Length"] = str(hlen)
    return httpx.post(f"{url}/v2/models/{model}/infer", content=body, headers=h, timeout=10)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_matches_local_tail(served, ref, binary):
    import tritonclient.http as tc

    client = tc.InferenceServerClient(served.removeprefix("http://"))
    meta = client.get_model_metadata(ref["model"], headers=dict(AUTH))
    assert [i["name"] for i in meta["inputs"]] == ["tokens", "indices"]
    inputs = []
    for name, arr, dt in (("tokens", ref["tokens"], "FP32"), ("indices", ref["indices"], "INT64")):
        inp = tc.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    res = client.infer(ref["model"], inputs, outputs=[tc.InferRequestedOutput("logits", binary_data=binary)],
                       parameters={"model_id": ref["manifest"]["model_id"]},
                       headers=dict(AUTH))   # tritonclient writes into the dict it is given
    np.testing.assert_allclose(res.as_numpy("logits"), ref["logits"], rtol=1e-5, atol=1e-5)
    assert res.get_response()["parameters"]["tail_ms"] > 0


@pytest.mark.parametrize("token_dtype", ["fp16", "int8"])
def test_compact_tokens_are_dequantised_server_side(served, ref, token_dtype):
    n = ref["manifest"]["num_patches"]
    p = codec.pack(ref["tokens"], ref["indices"], n, token_dtype)
    inputs = {"tokens": p.tokens, "indices": p.indices, **({"scales": p.scales} if p.scales is not None else {})}
    body, hlen = build_request(inputs, {"model_id": ref["manifest"]["model_id"]})
    r = post(served, ref["model"], body, hlen)
    assert r.status_code == 200, r.text
    hl = int(r.headers["inference-header-content-length"])
    logits = np.frombuffer(r.content[hl:], np.float32).reshape(ref["logits"].shape)
    expected = ref["tail"](*codec.unpack(p))                        # the same dequantised tokens, locally
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits.argmax(1) == ref["logits"].argmax(1)).all()      # and the wire format keeps the answer


def _request(ref, **change):
    """A binary request; `change` replaces arrays (tokens/indices/...) or the parameters."""
    arrays = {"tokens": ref["tokens"][:1], "indices": ref["indices"][:1]}
    params = {"model_id": ref["manifest"]["model_id"]}
    for k, v in change.items():
        if k == "params":
            params = v
        elif v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    return build_request(arrays, params)


def _bad_cases(ref):
    idx = ref["indices"][:1].copy()
    body, hlen = _request(ref)
    dup = idx.copy(); dup[0, 1] = dup[0, 0]
    unsorted = idx.copy(); unsorted[0, [0, 1]] = unsorted[0, [1, 0]]
    oor = idx.copy(); oor[0, -1] = ref["manifest"]["num_patches"]
    json_req = json.dumps({"inputs": [{"name": "tokens", "datatype": "FP32", "shape": [1, 17, 192], "data": [1, 2]}],
                           "parameters": {"model_id": ref["manifest"]["model_id"]}}).encode()
    absurd = json.dumps({"inputs": [{"name": "tokens", "datatype": "FP32", "shape": [2 ** 62, 2 ** 62],
                                     "parameters": {"binary_data_size": 4}}],
                         "parameters": {"model_id": ref["manifest"]["model_id"]}}).encode()
    m = ref["model"]
    return {
        "absurd shape": (m, absurd + b"\0" * 4, len(absurd), AUTH, 400, "does not match shape"),
        "malformed json": (m, b"{not json", None, AUTH, 400, "malformed JSON"),
        "wrong tensor name": (m, *_request(ref, tokens=None, toks=ref["tokens"][:1]), AUTH, 400, "unknown input"),
        "missing tensor": (m, *_request(ref, indices=None), AUTH, 400, "missing input 'indices'"),
        "wrong dtype": (m, *_request(ref, tokens=ref["tokens"][:1].astype(np.int32)), AUTH, 400, "'tokens' must be"),
        "wrong shape": (m, *_request(ref, tokens=ref["tokens"][:1, :5]), AUTH, 400, "'tokens' shape"),
        "json data size": (m, json_req, None, AUTH, 400, "values for shape"),
        "indices out of range": (m, *_request(ref, indices=oor), AUTH, 400, "out of range"),
        "duplicated indices": (m, *_request(ref, indices=dup), AUTH, 400, "strictly ascending"),
        "unsorted indices": (m, *_request(ref, indices=unsorted), AUTH, 400, "strictly ascending"),
        "int8 without scales": (m, *_request(ref, tokens=ref["tokens"][:1].astype(np.int8)), AUTH, 400, "scales"),
        "truncated binary": (m, body[:-10], hlen, AUTH, 400, "truncated"),
        "header length too long": (m, body, len(body) + 5, AUTH, 400, "Inference-Header-Content-Length"),
        "oversize body": (m, body + b"\0" * 1_200_000, hlen, AUTH, 413, "limit"),
        "wrong model id": (m, *_request(ref, params={"model_id": "0" * 16}), AUTH, 409, "does not match"),
        "missing model id": (m, *_request(ref, params={}), AUTH, 400, "missing model id"),
        "wrong model name": ("mercury_tail_k999", body, hlen, AUTH, 404, "unknown model"),
        "missing token": (m, body, hlen, {}, 401, "missing bearer token"),
        "bad token": (m, body, hlen, {"Authorization": "Bearer nope"}, 401, "invalid bearer token"),
    }


def test_bad_requests_get_clear_4xx_and_server_stays_ready(served, ref):
    for case, (model, body, hlen, headers, status, msg) in _bad_cases(ref).items():
        r = post(served, model, body, hlen, headers)
        assert r.status_code == status, f"{case}: {r.status_code} {r.text}"
        assert msg in r.json()["error"], f"{case}: {r.json()}"
        assert httpx.get(served + "/v2/health/ready", timeout=5).status_code == 200, case
    body, hlen = _request(ref)                                       # and good requests still work
    assert post(served, ref["model"], body, hlen).status_code == 200


def _metric(text, name, **labels):
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(sel)}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _settled_metrics(url):
    """/metrics once it stops changing (--engine ray: the replicas report their counts every second)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    for _ in range(10):
        time.sleep(1.5)
        text, last = httpx.get(url + "/metrics", timeout=5).text, text
        if text == last:
            break
    return text


def test_32_concurrent_clients_are_batched(served, ref):
    body, hlen = _request(ref)
    headers = {**AUTH, "Inference-Header-Content-Length": str(hlen)}
    url = f"{served}/v2/models/{ref['model']}/infer"
    before = _settled_metrics(served)

    async def one_client(stop, client):
        codes = []
        while time.monotonic() < stop:
            r = await client.post(url, content=body, headers=headers)
            codes.append(r.status_code)
            if r.status_code == 200:
                hl = int(r.headers["inference-header-content-length"])
                np.testing.assert_allclose(np.frombuffer(r.content[hl:], np.float32), ref["logits"][0], atol=1e-4)
        return codes

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:
            stop = time.monotonic() + 3
            return await asyncio.gather(*(one_client(stop, client) for _ in range(32)))

    codes = [c for cs in asyncio.run(run()) for c in cs]
    assert len(codes) >= 32 and set(codes) == {200}
    text, m = _settled_metrics(served), ref["model"]
    runs = _metric(text, "mercury_batch_size_count", model=m) - _metric(before, "mercury_batch_size_count", model=m)
    images = _metric(text, "mercury_batch_size_sum", model=m) - _metric(before, "mercury_batch_size_sum", model=m)
    singles = (_metric(text, "mercury_batch_size_bucket", model=m, le="1")
               - _metric(before, "mercury_batch_size_bucket", model=m, le="1"))
    assert images == len(codes) and runs < images and singles < runs   # some batches held > 1 image
    assert _metric(text, "mercury_requests_total", model=m, status=200) >= len(codes)
    assert "mercury_request_latency_seconds_bucket" in text


def test_request_timeout_then_graceful_shutdown(export_dir, ref):
    """--timeout-s: a request slower than that gets 504 and the server stays ready; SIGTERM
    lets a request already in flight finish (200), then the process exits cleanly."""
    import signal
    import threading

    proc, url = spawn(export_dir, "--provider", "cpu", "--timeout-s", "0.001", "--max-batch", "256")
    try:
        big = {"tokens": np.repeat(ref["tokens"], 2, 0), "indices": np.repeat(ref["indices"], 2, 0)}
        body, hlen = build_request(big, {"model_id": ref["manifest"]["model_id"]})
        r = post(url, ref["model"], body, hlen, {})
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        assert httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(15)

    proc, url = spawn(export_dir, "--provider", "cpu", "--max-batch", "64")
    try:
        big = {"tokens": np.repeat(ref["tokens"], 16, 0), "indices": np.repeat(ref["indices"], 16, 0)}
        body, hlen = build_request(big, {"model_id": ref["manifest"]["model_id"]})
        result = {}
        sender = threading.Thread(target=lambda: result.update(r=post(url, ref["model"], body, hlen, {})))
        sender.start()
        deadline = time.monotonic() + 10                  # wait until the server is handling it
        while _metric(httpx.get(url + "/metrics").text, "mercury_requests_in_flight", model=ref["model"]) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        sender.join(30)
        assert proc.wait(30) in (0, -signal.SIGTERM)      # uvicorn re-raises the signal after draining
        assert result["r"].status_code == 200
        _, outputs = parse_response(result["r"].content, result["r"].headers["inference-header-content-length"])
        assert outputs["logits"].shape == (64, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
