"""serve-tail --engine ray --autoscale: the replica count rises under load and falls after it,
with small thresholds (target 2 ongoing requests per replica, 1 s up / 3 s down) and bounded
time. Its own module: it deploys a different application into the session's Ray cluster."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from mercury_onnx.formats.manifest import load_manifest, variant
from mercury_onnx.runtime.client import build_request
from mercury_onnx.runtime.head import Head
from mercury_onnx.formats.images import preprocess
from mercury_onnx.runtime.tail import model_name

from .conftest import spawn_ray
from .test_ray import serve_replicas, wait_for

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def autoscaled(export_dir, ray_cluster):
    proc, url = spawn_ray(export_dir, ray_cluster, "-r", "0.25", "--autoscale", "1:2", "--target-ongoing", "2",
                          "--upscale-delay-s", "1", "--downscale-delay-s", "3", "--max-batch", "4",
                          "--num-cpus", "0.5", "--threads", "1", "--provider", "cpu")
    yield url
    proc.terminate()
    proc.wait(60)


def test_autoscaler_adds_a_replica_under_load_and_removes_it_after(export_dir, autoscaled, cifar_test):
    manifest = load_manifest(export_dir)
    v = variant(manifest, 0.25)
    model = model_name(v["keep_tokens"])
    out = Head(export_dir, 0.25, manifest=manifest)(preprocess(sorted(cifar_test.glob("*/0000.jpg"))[:1],
                                                               manifest["preprocess"]))
    body, hlen = build_request({"tokens": out["tokens"], "indices": out["indices"]},
                               {"model_id": manifest["model_id"]})
    wait_for(lambda: serve_replicas(model) == {"RUNNING": 1}, 60, "one replica to start with")

    stop, codes = threading.Event(), []

    def client():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                r = http.post(f"{autoscaled}/v2/models/{model}/infer", content=body,
                              headers={"Inference-Header-Content-Length": str(hlen)})
                codes.append(r.status_code)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(16)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: serve_replicas(model).get("RUNNING") == 2, 90, "a second replica under load")
        up = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    t1 = time.monotonic()
    wait_for(lambda: serve_replicas(model) == {"RUNNING": 1}, 90, "back to one replica after the load")
    print(f"\nscaled 1 -> 2 after {up:.1f} s of load ({len(codes)} requests), 2 -> 1 {time.monotonic() - t1:.1f} s after it")
    assert codes and set(codes) == {200}
