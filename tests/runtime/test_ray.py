"""serve-tail --engine ray beyond the protocol (which test_server.py checks on both engines):
the replicas as Serve reports them, one replica's process killed under 32 clients, and the
generated KubeRay RayService manifest."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mercury_onnx.formats.manifest import load_manifest
from mercury_onnx.runtime.ray_config import APP_NAME, INGRESS, SERVE_ENV, tail_route
from mercury_onnx.runtime.tail import model_name

from .conftest import spawn_ray

MAX_BATCH = 16


@pytest.fixture(scope="module")
def ray_served(export_dir, ray_cluster):
    """2 replicas per keep ratio (0.5 logical CPU, 1 ORT thread each) in the session's cluster."""
    proc, url = spawn_ray(export_dir, ray_cluster, "--replicas", "2", "--num-cpus", "0.5", "--threads", "1",
                          "--provider", "cpu", "--max-batch", str(MAX_BATCH), "--timeout-s", "30")
    # ready = one replica of each model answers; the second may still be starting
    for v in load_manifest(export_dir)["variants"]:
        wait_for(lambda: serve_replicas(model_name(v["keep_tokens"])) == {"RUNNING": 2}, 180,   # noqa: B023
                 "both replicas running")
    yield url
    proc.terminate()
    proc.wait(60)


def serve_replicas(deployment: str, app: str | None = None) -> dict[str, int]:
    """`serve status` for one deployment (in the application of the same name: a model's):
    replica state -> count (the test process is a driver of the same cluster)."""
    from ray import serve

    status = serve.status().applications.get(app or deployment)
    dep = status.deployments.get(deployment) if status else None
    return dict(dep.replica_states) if dep else {}


def replica_infos(model: str, want: int, tries: int = 200) -> dict[str, dict]:
    """replica id -> TailReplica.info() (pid, threads, providers) for `want` distinct replicas,
    by calling info() through a handle until the router has reached each."""
    from ray import serve

    handle = serve.get_deployment_handle(model, app_name=model)
    seen = {}
    for _ in range(tries):
        info = handle.info.remote().result(timeout_s=60)
        seen[info["replica"]] = info
        if len(seen) >= want:
            break
    return seen


def wait_for(pred, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := pred()):
            return v
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout:g} s")


@pytest.mark.ray
def test_status_shows_the_replicas(export_dir, ray_served):
    manifest = load_manifest(export_dir)
    for v in manifest["variants"]:
        model = model_name(v["keep_tokens"])
        assert serve_replicas(model) == {"RUNNING": 2}, model
        infos = replica_infos(model, 2)
        assert len(infos) == 2 and len({i["pid"] for i in infos.values()}) == 2   # two processes
        for i in infos.values():
            assert i["model"] == model and i["intra_op_threads"] == 1
            assert i["providers"] == ["CPUExecutionProvider"]
    assert serve_replicas(INGRESS, APP_NAME) == {"RUNNING": 1}


@pytest.mark.ray
def test_killed_replica_is_replaced_and_only_its_requests_fail(export_dir, ray_served, cifar_test):
    """32 device clients (head here, --fallback local) against 2 replicas; one replica's process
    is SIGKILLed mid-run. Every request ends (no hang); the failures are 503s of requests in
    flight on the killed replica, each covered by the local fallback; Ray starts a new replica."""
    from mercury_onnx.runtime.client import Client

    manifest = load_manifest(export_dir)
    model = model_name(manifest["variants"][0]["keep_tokens"])
    victim = next(iter(replica_infos(model, 2).values()))
    image = sorted(cifar_test.glob("*/0000.jpg"))[0]
    results, stop, kill_at = [], threading.Event(), {}
    lock = threading.Lock()

    def one_client():
        client = Client(export_dir, ray_served, token_dtype="fp32", fallback="local", timeout=30, threads=1)
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                p = client.predict([image])[0]
                with lock:
                    results.append((t0, time.monotonic(), p.where, p.note))
        finally:
            client.close()

    before = httpx.get(ray_served + "/metrics", timeout=10).text
    threads = [threading.Thread(target=one_client, daemon=True) for _ in range(32)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) >= 64, 120, "64 answers before the kill", 0.05)
    kill_at["t"] = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"         # zero hangs

    after = [r for r in results if r[0] > kill_at["t"] + 5]                 # started 5 s after the kill
    failed = [r for r in results if r[2] == "local"]
    print(f"\n{len(results)} requests, {len(failed)} failed over to local (started "
          f"{[round(r[0] - kill_at['t'], 2) for r in failed]} s from the kill)")
    assert len(failed) <= 32                              # at most every client's request (max_ongoing_requests 64)
    assert all("503" in r[3] and "replica" in r[3] for r in failed), failed[:2]
    assert all(r[0] < kill_at["t"] + 1.0 for r in failed)                  # in flight at the kill (+ routing lag)
    assert after and all(r[2] == "split" for r in after)                    # the endpoint keeps answering
    assert all(r[1] - r[0] < 30 for r in results)

    grab = lambda text: float((re.search(rf'^mercury_errors_total{{model="{model}",reason="replica_failed"}} (\S+)$',  # noqa: E731
                                         text, re.M) or [0, 0])[1])
    # the server counted the same failures (the proxy reports its counts to /metrics within a second)
    wait_for(lambda: grab(httpx.get(ray_served + "/metrics", timeout=10).text) - grab(before) == len(failed), 10,
             f"/metrics counting the {len(failed)} failed requests")

    infos = wait_for(lambda: serve_replicas(model) == {"RUNNING": 2} and replica_infos(model, 2), 120,
                     "Ray replaces the killed replica")
    assert victim["pid"] not in {i["pid"] for i in infos.values()}


def test_kuberay_manifest_names_the_models_and_ports(export_dir, tmp_path):
    yaml = pytest.importorskip("yaml")
    manifest = load_manifest(export_dir)
    out = tmp_path / "rayservice.yaml"
    r = subprocess.run([sys.executable, "-m", "mercury_onnx.cli", "serve-tail", str(export_dir), "--engine", "ray",
                        "--autoscale", "1:3", "--num-cpus", "2", "--port", "8080", "--auth-token", "do-not-leak",
                        "--max-ongoing", "96", "--kuberay-manifest", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "do-not-leak" not in text                                        # the token stays a secret
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert serve_cfg["http_options"]["port"] == 8080
    apps = {a["name"]: a for a in serve_cfg["applications"]}
    models = sorted(model_name(v["keep_tokens"]) for v in manifest["variants"])
    assert sorted(apps) == sorted([*models, APP_NAME]) and sorted(doc["metadata"]["annotations"]["mercury-onnx/models"].split(",")) == models
    assert doc["metadata"]["annotations"]["mercury-onnx/model-id"] == manifest["model_id"]
    front = apps[APP_NAME]
    assert front["route_prefix"] == "/" and front["import_path"] == "mercury_onnx.runtime.ray_engine:build"
    assert front["deployments"] == [{"name": INGRESS, "num_replicas": 1}]
    for m in models:                          # each model's requests go straight to its tail replicas
        app = apps[m]
        assert app["route_prefix"] == tail_route(m) == f"/v2/models/{m}" and app["args"]["model"] == m
        assert app["import_path"] == "mercury_onnx.runtime.ray_engine:build_tail"
        (d,) = app["deployments"]
        assert d["name"] == m and d["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
        assert d["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
        assert d["max_ongoing_requests"] == 96                              # --max-ongoing
    for app in apps.values():
        assert app["args"]["export_dir"] == str(export_dir.resolve()) and app["args"]["autoscale"] == "1:3"
        assert app["args"]["max_ongoing"] == 96
    cluster = doc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]} == {
        "gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8080}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"   # replicas go to workers
    assert {"name": "RAY_max_direct_call_object_size", "value": "1048576"} in head["env"]   # requests inline
    for k, v in SERVE_ENV.items():                                          # e.g. the proxy's 503 for a dead replica
        assert {"name": k, "value": v} in head["env"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["maxReplicas"] == 3 * len(models) and workers["rayStartParams"]["num-cpus"] == "2"
    assert cluster["enableInTreeAutoscaling"] is True


@pytest.mark.ray
def test_kuberay_args_build_the_applications(export_dir):
    """The manifest's import paths and args really build the Serve applications (no cluster
    needed to build them): what KubeRay would deploy is what the CLI deploys."""
    import importlib

    yaml = pytest.importorskip("yaml")
    from mercury_onnx.runtime.kuberay import rayservice_yaml

    manifest = load_manifest(export_dir)
    names = [model_name(v["keep_tokens"]) for v in manifest["variants"]]
    doc = yaml.safe_load(rayservice_yaml(str(export_dir), names, manifest["model_id"], replicas=2, max_batch=8))
    built = {}
    for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
        module, _, fn = app["import_path"].partition(":")
        built[app["name"]] = getattr(importlib.import_module(module), fn)(app["args"])._bound_deployment  # noqa: SLF001
    assert sorted(built) == sorted([*names, APP_NAME]) and built[APP_NAME].name == INGRESS
    for name in names:
        d = built[name]
        assert d.name == name and d.num_replicas == 2 and d.max_ongoing_requests == 64   # max(64, 2 x 8)
        assert d.init_args[0].name == name                                  # the ServedModel it serves


@pytest.mark.parametrize("args, msg", [(["--autoscale", "3:1"], "MIN:MAX"), (["--autoscale", "2"], "MIN:MAX"),
                                       (["--replicas", "0"], "--replicas"), (["--engine", "k8s"], "--engine"),
                                       (["--num-gpus", "1", "--provider", "cpu"], "GPU replica"),
                                       (["--max-ongoing", "4", "--max-batch", "8"], "--max-ongoing")])
def test_bad_ray_options_are_one_line_errors(export_dir, args, msg):
    r = subprocess.run([sys.executable, "-m", "mercury_onnx.cli", "serve-tail", str(export_dir), "--engine", "ray",
                        *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
