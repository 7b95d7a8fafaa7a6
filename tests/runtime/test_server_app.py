"""serve-tail's app in process (Starlette's TestClient): another engine that replaces only
TailServer.submit/start/stop (as a Ray Serve deployment would) answers like serve-tail."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve-tail app needs starlette (the [cloud] or [test] extra)")
from starlette.testclient import TestClient  # noqa: E402

from mercury_onnx.runtime import protocol as P  # noqa: E402
from mercury_onnx.runtime.client import build_request, parse_response  # noqa: E402
from mercury_onnx.runtime.server import Lane, TailServer, create_app  # noqa: E402


class DirectEngine(TailServer):
    """No queue, no batcher: every request is its own tail run, on a tail of the engine's own."""

    def __init__(self, models, tails):
        super().__init__({n: Lane(m, None) for n, m in models.items()}, next(iter(models.values())).model_id,
                         auth_token="t")
        self.tails, self.runs = tails, 0

    async def start(self):
        pass

    async def stop(self):
        pass

    async def submit(self, lane, req):
        self.runs += 1
        (logits,) = await asyncio.to_thread(P.run_batch, self.tails[lane.model.name], [req])
        return logits, 0.0, req.size, 0.0


def _infer(client, model, body, hlen):
    r = client.post(f"/v2/models/{model}/infer", content=body,
                    headers={"Authorization": "Bearer t", "Inference-Header-Content-Length": str(hlen)})
    return r, (parse_response(r.content, r.headers.get("inference-header-content-length"))[1] if r.status_code == 200
               else None)


def test_an_engine_replacing_submit_answers_like_serve_tail(export_dir):
    models = P.served_models(export_dir)
    m = models["mercury_tail_k16"]
    tail = m.load_tail("cpu")
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((3, *m.tokens_shape)).astype(np.float32)
    indices = np.sort(np.stack([rng.choice(m.num_patches, m.keep, replace=False) for _ in range(3)]), 1)
    body, hlen = build_request({"tokens": tokens, "indices": indices}, {"model_id": m.model_id})
    bad, bad_hlen = build_request({"tokens": tokens}, {"model_id": m.model_id})
    engine = DirectEngine(models, {m.name: tail})
    answers = {}
    for name, app in (("serve-tail", create_app(export_dir, provider="cpu", auth_token="t")),
                      ("direct", engine.app())):
        with TestClient(app) as client:
            r, out = _infer(client, m.name, body, hlen)
            assert r.status_code == 200, r.text
            answers[name] = out["logits"]
            r, _ = _infer(client, m.name, bad, bad_hlen)
            assert r.status_code == 400 and "missing input 'indices'" in r.json()["error"]
            assert client.get(f"/v2/models/{m.name}").status_code == 401          # auth on every route
            assert 'mercury_errors_total{model="mercury_tail_k16",reason="bad_request"} 1' in client.get("/metrics").text
    assert engine.runs == 1
    np.testing.assert_allclose(answers["direct"], tail(tokens, indices), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(answers["serve-tail"], answers["direct"], rtol=1e-5, atol=1e-5)
