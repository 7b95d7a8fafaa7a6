"""serve-tail --engine ray: the same KServe v2 endpoint, with the tails on Ray Serve replicas.

    HTTP -> Ray Serve proxy -> Ingress (1 replica: the serve-tail protocol app) -> TailReplica
                                                        one deployment per keep ratio, N replicas

- The ingress is serve-tail's own app (server.TailServer's routes over runtime/protocol.py and
  runtime/metrics.py: auth, size limits, parsing, model_id and codec checks, response
  encoding, /v2/health/*, /metrics); only `submit` (with `start`/`stop`), the step that brings
  a request to onnxruntime, differs: a Ray handle call to the tail deployment instead of the
  in-process batcher. The replica runs the
  batch with the same protocol.run_batch.
- TailReplica batches with `@serve.batch` (max_batch_size counts images, not requests;
  batch_wait_timeout_s = --max-delay-ms) and runs ORT in a worker thread, so the replica's
  event loop keeps taking requests while a batch runs. ORT's intra-op threads are set
  explicitly (Ray sets OMP_NUM_THREADS=1 in workers, and ORT left to defaults inside Ray runs
  slower) and match the replica's num_cpus.
- The replica's queue is deep: max_ongoing_requests = --max-ongoing, default max(64, 2 x the
  batch) (ray_config.max_ongoing). Requests beyond it wait in the ingress's Serve router,
  which retries a full replica after a backoff (25 ms, doubling to 0.5 s) rather than when a
  slot frees, so with a shallow queue (2 x the batch) the replica ran dry between those
  retries under load (measured: docs/results/runtime.md).
- A local cluster started here passes actor-call arguments up to 1 MiB inline
  (ray_config.SYSTEM_CONFIG): a request's tokens cross proxy -> ingress -> replica without
  the object store (Ray's inline limit is 100 KiB; a DeiT-S request is 150 KB).
- Ray 2.60's batcher forms the next batch as soon as the previous one has started (it does not
  wait for the running one to finish), so a batch holds what arrived within
  batch_wait_timeout_s of its first request: with a 2 ms wait and a tail run of 60+ ms,
  batches of 1-2 images under load even with 30 requests queued, where serve-tail's own
  batcher fills them (measured: docs/results/runtime.md). On a CPU that costs little (a DeiT-S
  tail is about as fast per image at batch 1 as at 8); on a GPU, raise --max-delay-ms towards
  the tail's batch time.
- With num_gpus > 0 the replica asks Ray for the GPU, opens the tail with the CUDA provider
  and refuses to start unless the session really runs on CUDA with a GPU Ray assigned.
  (Untested here: no GPU on this machine.)
- Replicas that die are restarted by Ray; requests in flight on a dead replica get a 503 (the
  device client's --fallback local covers them); later requests go to the live replicas.

`build(args)` is a Ray Serve application builder: `serve run`, the CLI and the KubeRay
RayService (runtime/kuberay.py) all deploy the same application from the same arguments.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve
from starlette.applications import Starlette

from . import protocol as P
from .ray_config import DEFAULTS, SYSTEM_CONFIG, max_ongoing, parse_autoscale
from .server import Lane, TailServer, error

APP_NAME = "mercury"
INGRESS = "ingress"
QUIET = {"log_level": "WARNING", "enable_access_log": False}   # a log line per request costs CPU


def replica_threads(args: dict) -> int:
    """ORT intra-op threads of one replica: --threads, else the replica's whole CPUs (>= 1)."""
    return int(args.get("threads") or max(1, int(args.get("num_cpus") or 1)))


@serve.deployment(logging_config=QUIET, health_check_period_s=5, health_check_timeout_s=30)
class TailReplica:
    """One tail (one keep ratio) on ORT; Serve batches the requests that reach this replica."""

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

    @serve.batch(batch_size_fn=lambda items: sum(req.size for req, _ in items))
    async def run(self, items: list[tuple[P.InferRequest, float]]) -> list[tuple]:
        """[(request, time sent)] -> [(logits (b, C), tail_s, batch images, queue_s, info)]: one ORT run."""
        reqs = [req for req, _ in items]
        t0 = time.time()
        logits = await asyncio.get_running_loop().run_in_executor(self.pool, P.run_batch, self.tail, reqs)
        dt, images = time.time() - t0, sum(r.size for r in reqs)
        self.runs += 1
        # the first request of a batch reports the batch to the ingress's /metrics; queue_s is
        # wall-clock across processes (and machines: clamped at 0 against clock skew)
        return [(out, dt, images, max(0.0, t0 - t_sent), {"replica": self.replica, "batch_first": i == 0})
                for i, (out, (_, t_sent)) in enumerate(zip(logits, items))]

    async def __call__(self, req: P.InferRequest, t_sent: float):
        return await self.run((req, t_sent))

    def info(self) -> dict:
        """What this replica runs on (the tests use the pid to kill one)."""
        s = self.tail.session
        return {"replica": self.replica, "pid": os.getpid(), "model": self.model.name, "runs": self.runs,
                "providers": s.get_providers(), "intra_op_threads": s.get_session_options().intra_op_num_threads}


class RayTailServer(TailServer):
    """serve-tail's handlers (protocol, auth, limits, metrics) with one difference: a request's
    batch reaches onnxruntime through the tail deployment's Ray handle, not a local batcher."""

    def __init__(self, handles: dict, models: dict[str, P.ServedModel], **kw):
        lanes = {name: Lane(m, tail=None) for name, m in models.items()}   # no session in the ingress
        super().__init__(lanes, next(iter(models.values())).model_id, **kw)
        self.handles, self.tails_up = handles, False

    async def ready(self, request):
        """Ready once every tail deployment has answered once (the ingress starts before them)."""
        if not self.tails_up:
            calls = [h.info.remote() for h in self.handles.values()]
            try:
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
        """Nothing to stop: Serve drains the replicas."""

    async def submit(self, lane: Lane, req: P.InferRequest) -> tuple:
        """-> (logits, tail_s, batch images, queue_s); 504 after timeout_s, 503 when the replica died."""
        import ray.exceptions

        name = lane.model.name
        response = self.handles[name].remote(req, time.time())
        try:
            logits, tail_s, images, queue_s, info = await asyncio.wait_for(_await(response), self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise P.RequestError(f"inference took longer than the server's {self.timeout_s:g} s timeout", 504) from None
        except ray.exceptions.RayError as e:   # the replica died or is gone: retryable, say so
            err = P.RequestError(f"tail replica of {name} failed during the request ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0][:200]}); retry, Ray replaces failed replicas", 503)
            err.reason = "replica_failed"
            raise err from None
        if info["batch_first"]:
            self.metrics.batch_run(name, images, tail_s)
        return logits, tail_s, images, queue_s


async def _await(response):
    return await response


@serve.deployment(logging_config=QUIET, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The serve-tail protocol app, with RayTailServer's handle calls as its engine."""

    def __init__(self, handles: dict, args: dict):
        self.handles, self.args = handles, args

    def __serve_build_asgi_app__(self) -> Starlette:
        a = self.args
        models = P.served_models(a["export_dir"], a["keep_ratios"], a["tail_dtype"])
        return RayTailServer(self.handles, models, max_batch=int(a["max_batch"]), max_delay_ms=a["max_delay_ms"],
                             auth_token=a["auth_token"], max_body=int(a["max_body_mb"] * 1024 * 1024),
                             timeout_s=float(a["timeout_s"])).app()


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


def build(args: dict):
    """Ray Serve application builder: one TailReplica deployment per keep ratio + the ingress."""
    args = {**DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)} for the mercury Serve application")
    if isinstance(args["autoscale"], str):
        args["autoscale"] = parse_autoscale(args["autoscale"])
    if not args["auth_token"]:   # a RayService passes the token through the environment, not its YAML
        args["auth_token"] = os.environ.get("MERCURY_AUTH_TOKEN") or None
    args["export_dir"] = os.path.abspath(args["export_dir"])
    models = P.served_models(args["export_dir"], args["keep_ratios"], args["tail_dtype"])
    # each deployment gets only the arguments it reads: a new replica count then rescales in
    # place instead of restarting every replica
    replica_args = {k: args[k] for k in ("provider", "num_gpus", "num_cpus", "threads", "tail_dtype",
                                         "max_batch", "max_delay_ms")}
    ingress_args = {k: args[k] for k in ("export_dir", "keep_ratios", "tail_dtype", "max_batch",
                                         "max_delay_ms", "auth_token", "max_body_mb", "timeout_s")}
    handles = {name: TailReplica.options(**deployment_options(args, name)).bind(m, replica_args)
               for name, m in models.items()}
    return Ingress.options(name=INGRESS).bind(handles, ingress_args)


def start_cluster(args: dict, host: str, port: int, address: str | None = None, log=print) -> None:
    """ray.init (a running cluster at `address`, else a local one with enough logical CPUs for
    every replica, logical, not more cores, and ray_config.SYSTEM_CONFIG) and Serve's HTTP
    proxy at host:port."""
    import ray

    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    else:
        lo_hi = args["autoscale"] or (args["replicas"], args["replicas"])
        models = P.served_models(args["export_dir"], args["keep_ratios"], args["tail_dtype"])
        need = int(np.ceil(lo_hi[1] * float(args["num_cpus"]) * len(models)))
        ray.init(num_cpus=max(os.cpu_count() or 1, need), num_gpus=None if args["num_gpus"] else 0,
                 include_dashboard=False, logging_level="WARNING", log_to_driver=False, _system_config=SYSTEM_CONFIG)
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    http = serve.context._get_global_client().http_config   # noqa: SLF001 - no public getter
    if (http.host, http.port) != (host, port):
        log(f"warning: Serve already runs on this cluster at {http.host}:{http.port}; "
            f"--host/--port ignored (Serve has one HTTP address per cluster)")


def serve_forever(args: dict, host: str, port: int, address: str | None, log=print) -> None:
    """Connect to (or start) a Ray cluster, deploy, and block until SIGINT/SIGTERM; then
    delete the application (and stop the local cluster if this process started it)."""
    import ray

    args = {**DEFAULTS, **args}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    start_cluster(args, host, port, address, log)
    try:
        serve.run(build(args), name=APP_NAME, route_prefix="/", logging_config=QUIET)
        log(f"ray cluster {ray.get_runtime_context().gcs_address}: application {APP_NAME!r} running")
        stop.wait()
    finally:
        try:
            serve.delete(APP_NAME)
            if not address:
                serve.shutdown()
        finally:
            ray.shutdown()
