"""The layout and arguments of the mercury Ray Serve applications (ray_engine), without importing
Ray: which application serves which routes, the builders' defaults, the --autoscale format, and
Ray's switch for a loopback-only local cluster. Shared by the CLI (ray_cli), the engine
(ray_engine), the KubeRay manifest (kuberay), the tests and the benchmark.

The layout: one application per served model, named after it, at the route prefix
/v2/models/{model}: its ingress is the tail deployment itself, so Serve's HTTP proxy hands a
model's requests (infer, metadata, ready) straight to a tail replica; and the application
`mercury` at / (deployment `ingress`): health, server metadata, /metrics, unknown models.
"""
from __future__ import annotations

# read when Ray is imported: "0" makes a local cluster use 127.0.0.1 instead of the machine's address
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray core settings of a cluster this project starts (ray.init(_system_config=...); on a cluster
# of your own: `ray start --head --system-config '{"max_direct_call_object_size": 1048576}'`).
# Actor-call arguments up to 1 MiB travel inline in the call instead of through the object
# store (Ray's default limit is 100 KiB; a DeiT-S request's tokens are 150 KB): one put and one
# get fewer per request and hop. Measured: docs/results/runtime.md.
SYSTEM_CONFIG = {"max_direct_call_object_size": 1 << 20}
# Ray Serve settings in the environment of Ray's processes (set before the cluster starts; on a
# cluster of your own: on every node before `ray start`):
# - the HTTP proxy loads ray_engine.proxy_middlewares, which answers requests whose tail
#   replica died with a 503 and a reason, counted in /metrics;
# - replicas run our handlers on Serve's own event loop, not a second loop in another thread
#   (one thread hop fewer per request; nothing of ours blocks the loop: ORT runs in a worker);
# - Serve's controller loop every 0.5 s instead of 0.1 s (it took ~0.035 cores idle).
# Measured together (exploratory runs): docs/results/runtime.md.
SERVE_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mercury_onnx.runtime.ray_engine:proxy_middlewares",
             "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
APP_NAME, INGRESS = "mercury", "ingress"   # the front application and its one deployment
BUILD_FRONT, BUILD_TAIL = "mercury_onnx.runtime.ray_engine:build", "mercury_onnx.runtime.ray_engine:build_tail"
# every key ray_engine.build() takes, with its default: the CLI, tests and the RayService use these
DEFAULTS = dict(export_dir=None, keep_ratios=None, replicas=1, autoscale=None, target_ongoing=None,
                max_ongoing=None, upscale_delay_s=30.0, downscale_delay_s=600.0, num_cpus=1.0, num_gpus=0.0, threads=None,
                provider="auto", tail_dtype="float32", max_batch=16, max_delay_ms=2.0, auth_token=None,
                max_body_mb=16.0, timeout_s=10.0, model=None)


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX), 1 <= MIN <= MAX; ValueError with the fix otherwise."""
    lo, sep, hi = text.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 1 <= int(lo) <= int(hi):
        raise ValueError(f"--autoscale {text!r}: use MIN:MAX with 1 <= MIN <= MAX, e.g. 1:4")
    return int(lo), int(hi)


def max_ongoing(args: dict) -> int:
    """Requests one tail replica holds at once (queued at its batcher + running): --max-ongoing,
    else max(64, 2 x --max-batch). Deep on purpose: requests beyond it wait in the caller's
    Serve router, which retries a full replica after a backoff (25 ms doubling to 0.5 s) instead
    of when a slot frees, so a shallow replica queue runs dry under load (docs/results/runtime.md)."""
    return int(args.get("max_ongoing") or max(64, 2 * int(args.get("max_batch") or DEFAULTS["max_batch"])))


def tail_route(model: str) -> str:
    """The route prefix of a model's application: Serve's proxy sends every path under it there."""
    return f"/v2/models/{model}"


def applications(models: list[str]) -> list[tuple[str, str, str, dict]]:
    """(application name, route prefix, builder import path, extra builder args) of every
    application, the tails first (the front's readiness waits for them)."""
    return [(m, tail_route(m), BUILD_TAIL, {"model": m}) for m in models] + [(APP_NAME, "/", BUILD_FRONT, {})]
