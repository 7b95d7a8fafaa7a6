"""serve-tail --engine ray: the same KServe v2 endpoint, with the tails on Ray Serve replicas.

    HTTP -> Ray Serve proxy -> /v2/models/{model}/... -> TailReplica (that model's application:
                                                         N replicas, each serving its model's routes)
                            -> everything else (/)    -> Ingress (application `mercury`, 1 replica:
                                                         health, /v2, /metrics, unknown models)

- One application per served model (ray_config.applications), whose ingress is the tail
  deployment itself: the proxy hands a request straight to a tail replica, one Ray hop (an
  ingress in front of every request cost a second hop and ~0.2 cores at 22 images/s:
  docs/results/runtime.md). Replicas and front serve serve-tail's own routes (server.TailServer
  over runtime/protocol.py: auth, size limits, parsing, model_id and codec checks, encoding);
  only `submit` differs: in a replica, its own `@serve.batch` method; in the front (a model's
  request the proxy sent there, e.g. while that application deploys), a handle call.
- /metrics: each replica sends its counts to the front every PUSH_S seconds while they change;
  the front sums them with its own (so /metrics lags the replicas by up to PUSH_S).
- `@serve.batch`: max_batch_size counts images; batch_wait_timeout_s = --max-delay-ms; ORT runs
  in a worker thread, so the event loop keeps taking requests while a batch runs. Ray 2.60's
  batcher forms the next batch as soon as the previous one starts, from what arrived within
  the wait: batches of 1-2 under load on this CPU (cheap here; on a GPU raise --max-delay-ms).
  ORT's intra-op threads are set explicitly (Ray sets OMP_NUM_THREADS=1; ORT left to defaults
  inside Ray runs slower) and match num_cpus.
- A deep replica queue (max_ongoing_requests = --max-ongoing: ray_config.max_ongoing says why)
  and, in clusters started here, requests inline in actor calls (ray_config.SYSTEM_CONFIG).
- num_gpus > 0: the replica asks Ray for the GPU, opens the tail with the CUDA provider and
  refuses to start unless the session really runs on CUDA (untested here: no GPU).
- Ray restarts dead replicas; later requests go to the live ones. Requests in flight on a dead
  replica fail in Ray's proxy, which alone would answer an empty 500: ReplicaFailures, our
  middleware in the proxy (Serve's proxy callback, ray_config.SERVE_ENV, set by clusters this
  project starts), answers serve-tail's 503 with the reason (the device client's --fallback
  local covers it) and counts it in /metrics.

`build(args)` (the front) and `build_tail(args)` (one model's application) are Ray Serve
application builders: `deploy`, the CLI and the KubeRay RayService (runtime/kuberay.py)
deploy the same applications from the same arguments.
"""
from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve
from starlette.responses import Response

from . import protocol as P
from .metrics import Metrics
from .ray_config import (APP_NAME, BUILD_TAIL, DEFAULTS, INGRESS, SERVE_ENV, SYSTEM_CONFIG, applications,
                         max_ongoing, parse_autoscale)
from .server import Lane, TailServer, error

QUIET = {"log_level": "WARNING", "enable_access_log": False}   # a log line per request costs CPU
PUSH_S = 1.0         # a replica sends its counts to the front this often while they change,
HEARTBEAT_S = 5.0    # and at least this often; the front counts the in-flight requests of
STALE_S = 15.0       # replicas heard from within STALE_S only (a dead replica's stay out)
# each deployment gets only the arguments it reads (a new replica count rescales in place)
SERVER_KEYS = ("max_batch", "max_delay_ms", "auth_token", "max_body_mb", "timeout_s")
REPLICA_KEYS = ("provider", "num_gpus", "num_cpus", "threads", "tail_dtype", *SERVER_KEYS)
FRONT_KEYS = ("export_dir", "keep_ratios", "tail_dtype", *SERVER_KEYS)


def replica_threads(args: dict) -> int:
    """ORT intra-op threads of one replica: --threads, else the replica's whole CPUs (>= 1)."""
    return int(args.get("threads") or max(1, int(args.get("num_cpus") or 1)))


class RayTailServer(TailServer):
    """serve-tail's handlers (protocol, auth, limits, metrics) with Ray as the engine: in a tail
    replica (`replica` set), a request's batch reaches onnxruntime through the replica's
    @serve.batch method; in the front, through a handle call to the model's tail deployment."""

    def __init__(self, models: dict[str, P.ServedModel], a: dict, replica: "TailReplica | None" = None):
        lanes = {name: Lane(m, tail=None) for name, m in models.items()}   # the session is the replica's
        super().__init__(lanes, next(iter(models.values())).model_id, max_batch=int(a["max_batch"]),
                         max_delay_ms=a["max_delay_ms"], auth_token=a["auth_token"],
                         max_body=int(a["max_body_mb"] * 1024 * 1024), timeout_s=float(a["timeout_s"]))
        self.replica, self.handles, self.tails_up, self.pusher = replica, {}, False, None
        self.replica_counts: dict[str, tuple] = {}   # front: replica -> (when, model, Metrics.state(), in flight)

    def handle(self, name: str):
        if name not in self.handles:   # the model's own application, deployed beside this one
            self.handles[name] = serve.get_deployment_handle(name, app_name=name)
        return self.handles[name]

    async def ready(self, request):
        """The front: ready once every tail deployment has answered once (it may start before them)."""
        if not self.tails_up and not self.replica:
            calls = []
            try:
                calls = [self.handle(name).info.remote() for name in self.models]
                await asyncio.wait_for(asyncio.gather(*(_await(c) for c in calls)), 5)
                self.tails_up = True
            except Exception:   # noqa: BLE001 - still starting (or failing to): not ready
                for c in calls:
                    c.cancel()
                return error("not ready: tail replicas are starting", 503)
        return await super().ready(request)

    async def start(self) -> None:
        """Nothing to warm up or run here: the replicas warm up in __init__ (see ready())."""

    async def stop(self) -> None:
        """Stop sending counts (Serve drains the replicas)."""
        if self.pusher:
            self.pusher.cancel()

    async def infer(self, request):
        if self.replica and self.pusher is None:   # on the event loop that serves the requests
            (lane,) = self.lanes.values()
            self.pusher = start_pushing(self.replica.replica,
                                        lambda: (lane.model.name, self.metrics.state(), lane.open_requests))
        return await super().infer(request)

    async def submit(self, lane: Lane, req: P.InferRequest) -> tuple:
        """-> (logits, tail_s, batch images, queue_s); 504 after timeout_s, 503 when the replica died."""
        import ray.exceptions

        name = lane.model.name
        call = self.replica.run((req, time.time())) if self.replica else self.handle(name).infer.remote(req, time.time())
        try:
            logits, tail_s, images, queue_s, info = await asyncio.wait_for(_await(call), self.timeout_s)
        except asyncio.TimeoutError:
            if not self.replica:
                call.cancel()
            raise P.RequestError(f"inference took longer than the server's {self.timeout_s:g} s timeout", 504) from None
        except ray.exceptions.RayError as e:   # the replica died or is gone: retryable, say so
            err = P.RequestError(f"tail replica of {name} failed during the request ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0][:200]}); retry, Ray replaces failed replicas", 503)
            err.reason = "replica_failed"
            raise err from None
        if info["batch_first"]:
            self.metrics.batch_run(name, images, tail_s)
        return logits, tail_s, images, queue_s

    async def prometheus(self, request):
        """The front: its own counts plus every replica's last ones; a replica only."""
        if self.replica:
            return await super().prometheus(request)
        total, now = Metrics(self.max_batch), time.monotonic()
        total.add(self.metrics.state())
        in_flight = {name: lane.open_requests for name, lane in self.lanes.items()}
        for when, model, state, n in list(self.replica_counts.values()):
            total.add(state)
            if model and now - when < STALE_S:
                in_flight[model] = in_flight.get(model, 0) + n
        return Response(total.render(in_flight), media_type="text/plain; version=0.0.4")


async def _await(response):
    return await response


def start_pushing(source: str, counts) -> asyncio.Task:
    """push_counts as a task outside the request that starts it (in an empty context: a handle
    call made in the context of an HTTP request inside Ray's proxy would be sent as one)."""
    return asyncio.create_task(push_counts(source, counts), context=contextvars.Context())


async def push_counts(source: str, counts) -> None:
    """Send counts() = (model, Metrics.state(), requests in flight) to the front's /metrics
    every PUSH_S seconds while they change, and every HEARTBEAT_S seconds (a failed send is
    repeated next time: the front may be starting or gone)."""
    front = serve.get_deployment_handle(INGRESS, app_name=APP_NAME)
    last, sent = None, 0.0
    while True:
        await asyncio.sleep(PUSH_S)
        now = counts()
        if now != last or time.monotonic() - sent > HEARTBEAT_S:
            try:
                await asyncio.wait_for(_await(front.counts.remote(source, *now)), 10)
                last, sent = now, time.monotonic()
            except Exception:   # noqa: BLE001 - next time
                pass


class ReplicaFailures:
    """ASGI middleware for Ray's HTTP proxy (proxy_middlewares): a model request whose tail
    replica died before answering gets serve-tail's 503 with a reason (the proxy alone answers
    an empty 500), counted in /metrics as mercury_errors_total{reason="replica_failed"}. A
    client that hung up is not answered nor counted."""

    def __init__(self, app):
        self.app, self.metrics, self.pusher = app, Metrics(1), None

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v2/models/"):
            return await self.app(scope, receive, send)
        t0, seen = time.perf_counter(), set()

        async def receive_():
            message = await receive()
            seen.add(message["type"])
            return message

        async def send_(message):
            seen.add(message["type"])
            await send(message)

        await self.app(scope, receive_, send_)
        if "http.response.start" in seen or "http.disconnect" in seen:
            return
        model = path.split("/")[3]
        await error(f"tail replica of {model} failed during the request (Ray's proxy got no answer); "
                    "retry, Ray replaces failed replicas", 503)(scope, receive, send)
        self.metrics.error(model, "replica_failed")
        self.metrics.request(model, 503, time.perf_counter() - t0)
        if self.pusher is None:
            self.pusher = start_pushing(f"proxy {os.getpid()}", lambda: ("", self.metrics.state(), 0))


def proxy_middlewares() -> list:
    """Serve's proxy callback (ray_config.SERVE_ENV names it): the middlewares of Ray's HTTP proxy."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailures)]


@serve.deployment(logging_config=QUIET, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class TailReplica:
    """One tail (one keep ratio) on ORT, serving its model's routes; Serve batches the requests
    that reach this replica."""

    def __init__(self, model: P.ServedModel, args: dict):
        import ray

        provider = args["provider"]
        if args["num_gpus"]:   # the GPU must be Ray's to give and ORT's to use: fail loudly otherwise
            if not ray.get_gpu_ids():
                raise RuntimeError(f"asked Ray for num_gpus={args['num_gpus']} but the replica was given no GPU")
            provider = "cuda"                       # Tail refuses to fall back to CPU
        self.model, self.tail = model, model.load_tail(provider, replica_threads(args))
        self.pool = ThreadPoolExecutor(1)           # ORT off the event loop: batches fill while one runs
        self.runs = 0
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.tail(np.zeros((1, *model.tokens_shape), model.io_dtype), np.arange(model.keep)[None])   # warm-up
        self.run.set_max_batch_size(args["max_batch"])
        self.run.set_batch_wait_timeout_s(args["max_delay_ms"] / 1000)
        self.server = RayTailServer({model.name: model}, args, replica=self)

    def __serve_build_asgi_app__(self):
        app = self.server.app()

        async def from_root(scope, receive, send):   # Serve sets root_path to the route prefix;
            scope["root_path"] = ""                 # serve-tail's routes are whole paths
            await app(scope, receive, send)

        return from_root

    @serve.batch(batch_size_fn=lambda items: sum(req.size for req, _ in items))
    async def run(self, items: list[tuple[P.InferRequest, float]]) -> list[tuple]:
        """[(request, time sent)] -> [(logits (b, C), tail_s, batch images, queue_s, info)]: one ORT run."""
        reqs = [req for req, _ in items]
        t0 = time.time()
        logits = await asyncio.get_running_loop().run_in_executor(self.pool, P.run_batch, self.tail, reqs)
        dt, images = time.time() - t0, sum(r.size for r in reqs)
        self.runs += 1
        # the first request of a batch reports the batch to /metrics; queue_s is wall-clock across
        # processes (and machines, for the front's handle calls: clamped at 0 against clock skew)
        return [(out, dt, images, max(0.0, t0 - t_sent), {"replica": self.replica, "batch_first": i == 0})
                for i, (out, (_, t_sent)) in enumerate(zip(logits, items))]

    async def infer(self, req: P.InferRequest, t_sent: float):
        """A checked request from the front (a handle call), batched with the HTTP ones."""
        return await self.run((req, t_sent))

    def info(self) -> dict:
        """What this replica runs on (the tests use the pid to kill one)."""
        s = self.tail.session
        return {"replica": self.replica, "pid": os.getpid(), "model": self.model.name, "runs": self.runs,
                "providers": s.get_providers(), "intra_op_threads": s.get_session_options().intra_op_num_threads}


@serve.deployment(logging_config=QUIET, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The front: serve-tail's routes for what the proxy does not send to a model's application
    (health, /v2, /metrics with every replica's counts, unknown models)."""

    def __init__(self, args: dict):
        self.server = RayTailServer(P.served_models(args["export_dir"], args["keep_ratios"], args["tail_dtype"]), args)

    def __serve_build_asgi_app__(self):
        return self.server.app()

    async def counts(self, source: str, model: str, state: dict, in_flight: int) -> None:
        """A replica's (or a proxy's) counts so far; on the app's event loop, where /metrics reads them."""
        self.server.replica_counts[source] = (time.monotonic(), model, state, in_flight)


def deployment_options(args: dict, name: str) -> dict:
    """Serve options of one tail deployment: replicas or autoscaling, per-replica resources."""
    mb = int(args["max_batch"])
    opts = {"name": name, "max_ongoing_requests": max_ongoing(args),
            "ray_actor_options": {"num_cpus": float(args["num_cpus"]), "num_gpus": float(args["num_gpus"])}}
    if args.get("autoscale"):
        lo, hi = args["autoscale"]
        opts["autoscaling_config"] = {
            "min_replicas": int(lo), "max_replicas": int(hi), "initial_replicas": int(lo),
            "target_ongoing_requests": float(args.get("target_ongoing") or mb),
            "upscale_delay_s": float(args["upscale_delay_s"]), "downscale_delay_s": float(args["downscale_delay_s"]),
            "metrics_interval_s": 1.0, "look_back_period_s": 2.0}
    else:
        opts["num_replicas"] = int(args["replicas"])
    return opts


def complete(args: dict) -> dict:
    """build()'s arguments with defaults filled in and checked (ValueError for unknown keys)."""
    args = {**DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)} for the mercury Serve applications")
    if isinstance(args["autoscale"], str):
        args["autoscale"] = parse_autoscale(args["autoscale"])
    if not args["auth_token"]:   # a RayService passes the token through the environment, not its YAML
        args["auth_token"] = os.environ.get("MERCURY_AUTH_TOKEN") or None
    args["export_dir"] = os.path.abspath(args["export_dir"])
    return args


def build(args: dict):
    """Ray Serve application builder: the front (application `mercury`, route /)."""
    args = complete(args)
    P.served_models(args["export_dir"], args["keep_ratios"], args["tail_dtype"])   # ManifestError now, not in Ray
    return Ingress.options(name=INGRESS).bind({k: args[k] for k in FRONT_KEYS})


def build_tail(args: dict):
    """Ray Serve application builder: the tail replicas of the model args['model'] (its own
    application, route /v2/models/{model})."""
    args = complete(args)
    models = P.served_models(args["export_dir"], args["keep_ratios"], args["tail_dtype"])
    if (name := args["model"]) not in models:
        raise ValueError(f"model {name!r} is not served from {args['export_dir']}: {sorted(models)}")
    return TailReplica.options(**deployment_options(args, name)).bind(models[name], {k: args[k] for k in REPLICA_KEYS})


def deploy(args: dict) -> list[str]:
    """Deploy (or update in place) every application of ray_config.applications, and wait until
    they run. Returns their names."""
    args = complete(args)
    apps = applications(list(P.served_models(args["export_dir"], args["keep_ratios"], args["tail_dtype"])))
    serve.run_many([serve.RunTarget((build_tail if path == BUILD_TAIL else build)({**args, **extra}), name=name,
                                    route_prefix=route, logging_config=QUIET)
                    for name, route, path, extra in apps])
    return [name for name, *_ in apps]


def start_cluster(args: dict, host: str, port: int, address: str | None = None, log=print) -> None:
    """ray.init (a running cluster at `address`, else a local one with enough logical CPUs for
    every replica, logical, not more cores, ray_config.SYSTEM_CONFIG and SERVE_ENV) and Serve's
    HTTP proxy at host:port."""
    import ray

    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    else:
        lo_hi = args["autoscale"] or (args["replicas"], args["replicas"])
        models = P.served_models(args["export_dir"], args["keep_ratios"], args["tail_dtype"])
        need = int(np.ceil(lo_hi[1] * float(args["num_cpus"]) * len(models)))
        os.environ.update(SERVE_ENV)   # Ray's processes inherit it
        ray.init(num_cpus=max(os.cpu_count() or 1, need), num_gpus=None if args["num_gpus"] else 0,
                 include_dashboard=False, logging_level="WARNING", log_to_driver=False, _system_config=SYSTEM_CONFIG)
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    http = serve.context._get_global_client().http_config   # noqa: SLF001 - no public getter
    if (http.host, http.port) != (host, port):
        log(f"warning: Serve already runs on this cluster at {http.host}:{http.port}; "
            f"--host/--port ignored (Serve has one HTTP address per cluster)")


def serve_forever(args: dict, host: str, port: int, address: str | None, log=print) -> None:
    """Connect to (or start) a Ray cluster, deploy, and block until SIGINT/SIGTERM; then
    delete the applications (and stop the local cluster if this process started it)."""
    import ray

    args = {**DEFAULTS, **args}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    start_cluster(args, host, port, address, log)
    names = []
    try:
        names = deploy(args)
        log(f"ray cluster {ray.get_runtime_context().gcs_address}: applications {', '.join(names)} running")
        stop.wait()
    finally:
        try:
            for name in names:
                serve.delete(name)
            if not address:
                serve.shutdown()
        finally:
            ray.shutdown()
