"""serve-tail: the tail behind the Open Inference Protocol (KServe v2) REST API, on Starlette.

    app = create_app("export/", provider="cpu", max_batch=16, auth_token="s3cret")
    run(app, "0.0.0.0", 8000)                  # or: proc, url = spawn("export/", "--provider", "cpu")

Endpoints: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/1][/ready],
POST /v2/models/{name}[/versions/1]/infer, GET /metrics (Prometheus text).

The protocol itself (request parsing and validation, model ids, auth, size limits, the
response) is runtime/protocol.py and the Prometheus series runtime/metrics.py, shared with
other engines; this module adds the HTTP app (TailServer's routes) and dynamic batching
(TailServer.submit/start/stop, which another engine overrides). Each model has an asyncio
queue and a batcher task that takes up to `max_batch` images, waiting at most `max_delay_ms`
for more (not at all once every open request is in and the batch is as big as the previous
one, e.g. a lone request under light load), runs ORT in a worker thread and splits the
logits back to the requests. Every bad request is a 4xx with {"error": "..."}; the server
stays up and ready. A plain Starlette app under uvicorn (the [cloud] extra); numpy and
onnxruntime, no torch.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import protocol as P
from .metrics import Metrics
from .tail import Tail


def error(msg: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(P.error_body(msg), status, headers=headers, media_type=P.JSON_TYPE)


def ok(obj: dict) -> Response:
    return Response(json.dumps(obj), 200, media_type=P.JSON_TYPE)


# --------------------------------------------------------------------------- serving
@dataclass
class Job:
    req: P.InferRequest
    future: asyncio.Future          # -> (logits (b, C), tail seconds, batch images, queue seconds)
    t0: float

    @property
    def size(self) -> int:
        return self.req.size


@dataclass
class Lane:
    """One served model's session and batching state."""
    model: P.ServedModel
    tail: Tail | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)   # binds its loop on first use
    open_requests: int = 0          # in the handler now: reading, queued or running
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))


class TailServer:
    """serve-tail's routes (`app()`) over runtime/protocol.py, with metrics and health.

    How a checked request reaches the tail is `submit`: here each lane's queue and batcher,
    which `start` / `stop` run. Another engine with its own batching overrides those three
    and keeps the routes, checks, metrics and health (its lanes may then have no tail)."""

    def __init__(self, lanes: dict[str, Lane], model_id: str, *, max_batch: int = 16, max_delay_ms: float = 2.0,
                 auth_token: str | None = None, max_body: int = 16 << 20, timeout_s: float = 10.0):
        self.lanes, self.model_id = lanes, model_id
        self.models = {name: lane.model for name, lane in lanes.items()}
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1000
        self.auth_token, self.max_body, self.timeout_s = auth_token, max_body, timeout_s
        self.metrics, self.is_ready, self.tasks = Metrics(max_batch), False, []

    def app(self) -> Starlette:
        return Starlette(routes=self.routes(), lifespan=self.lifespan,
                         exception_handlers={StarletteHTTPException: http_error, P.RequestError: request_error})

    # ----------------------------------------------------------------------- batching
    async def next_batch(self, lane: Lane, carry: Job | None, last_jobs: int) -> tuple[list[Job], Job | None]:
        """Jobs for one tail run (at most max_batch images), and the job that did not fit."""
        loop = asyncio.get_running_loop()
        first = carry or await lane.queue.get()
        jobs, n = [first], first.size
        deadline = loop.time() + self.max_delay
        while n < self.max_batch:
            if lane.queue.empty():
                # every open request is in, and the batch is as big as the last one (a lone
                # request under light load; a full round of closed-loop clients under load):
                # waiting longer would only wait for requests nobody has sent yet
                if len(jobs) >= lane.open_requests and len(jobs) >= last_jobs:
                    break
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(lane.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            else:
                job = lane.queue.get_nowait()
            if n + job.size > self.max_batch:
                return jobs, job
            jobs.append(job)
            n += job.size
        return jobs, None

    async def run_jobs(self, lane: Lane, jobs: list[Job]) -> None:
        """One tail run in the lane's worker thread; each job's future gets its logits."""
        jobs = [j for j in jobs if not j.future.done()]   # timed out while queued
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            logits = await asyncio.get_running_loop().run_in_executor(
                lane.pool, P.run_batch, lane.tail, [j.req for j in jobs])
        except Exception as e:   # noqa: BLE001 - report to the requests, keep serving
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        dt, images = time.perf_counter() - t0, sum(j.size for j in jobs)
        self.metrics.batch_run(lane.model.name, images, dt)
        for j, out in zip(jobs, logits):
            if not j.future.done():
                j.future.set_result((out, dt, images, t0 - j.t0))

    async def batcher(self, lane: Lane) -> None:
        carry, last_jobs = None, 1
        while True:
            jobs, carry = await self.next_batch(lane, carry, last_jobs)
            last_jobs = len(jobs)
            await self.run_jobs(lane, jobs)

    async def start(self) -> None:
        """Warm each tail up (the first ORT run allocates and is slow), then start the batchers."""
        loop = asyncio.get_running_loop()
        for lane in self.lanes.values():
            m = lane.model
            await loop.run_in_executor(lane.pool, lane.tail, np.zeros((1, *m.tokens_shape), m.io_dtype),
                                       np.arange(m.keep)[None])
        self.tasks = [asyncio.create_task(self.batcher(lane)) for lane in self.lanes.values()]

    async def stop(self) -> None:
        """Stop the batchers; requests still queued get 503; running tail calls finish."""
        for task in self.tasks:
            task.cancel()
        for lane in self.lanes.values():
            while not lane.queue.empty():
                j = lane.queue.get_nowait()
                if not j.future.done():
                    j.future.set_exception(P.RequestError("server shutting down", 503))
            lane.pool.shutdown(wait=True)

    @asynccontextmanager
    async def lifespan(self, app):
        await self.start()
        self.is_ready = True
        yield
        self.is_ready = False
        await self.stop()

    # ----------------------------------------------------------------------- inference
    async def read_body(self, request: Request) -> bytes:
        P.check_content_length(request.headers, self.max_body)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            P.check_body_size(size, self.max_body)
            chunks.append(chunk)
        return b"".join(chunks)

    async def submit(self, lane: Lane, req: P.InferRequest) -> tuple[np.ndarray, float, int, float]:
        """Queue one request for the batcher and wait for (logits (b, C), tail seconds, images
        in that tail run, seconds queued); 504 after timeout_s."""
        loop = asyncio.get_running_loop()
        job = Job(req, loop.create_future(), time.perf_counter())
        lane.queue.put_nowait(job)
        timer = loop.call_later(self.timeout_s, lambda: job.future.done() or job.future.set_exception(
            P.RequestError(f"inference took longer than the server's {self.timeout_s:g} s timeout", 504)))
        try:
            return await job.future
        finally:
            timer.cancel()

    async def infer_one(self, request: Request, lane: Lane, t_start: float) -> Response:
        req = P.decode_request(lane.model, request.headers, await self.read_body(request))
        logits, tail_s, batch, queue_s = await self.submit(lane, req)
        params = {"tail_ms": round(tail_s * 1000, 3), "queue_ms": round(queue_s * 1000, 3), "batch_size": batch,
                  "server_ms": round((time.perf_counter() - t_start) * 1000, 3)}
        body, headers = P.encode_response(lane.model, req, logits, params)
        return Response(body, 200, headers=headers)

    async def infer(self, request: Request) -> Response:
        """POST /v2/models/{name}[/versions/{version}]/infer."""
        t0 = time.perf_counter()
        name = request.path_params["name"]
        label = name if name in self.models else "_unknown"
        lane = None
        try:
            P.authorize(request.headers, self.auth_token)
            P.lookup(self.models, name, request.path_params.get("version", "1"))
            lane = self.lanes[name]
            lane.open_requests += 1
            response = await self.infer_one(request, lane, t0)
        except P.RequestError as e:
            response = error(str(e), e.status, e.headers)
            self.metrics.error(label, e.reason)
        except Exception as e:   # noqa: BLE001 - an ORT failure: a 500, the server keeps going
            response = error(f"inference failed: {type(e).__name__}: {e}", 500)
            self.metrics.error(label, "internal")
        finally:
            if lane is not None:
                lane.open_requests -= 1
        self.metrics.request(label, response.status_code, time.perf_counter() - t0)
        return response

    # ----------------------------------------------------------------------- metadata, health, metrics
    def model(self, request: Request) -> P.ServedModel:
        P.authorize(request.headers, self.auth_token)
        return P.lookup(self.models, request.path_params["name"], request.path_params.get("version", "1"))

    async def model_metadata(self, request: Request) -> Response:
        return ok(self.model(request).metadata())

    async def model_ready(self, request: Request) -> Response:
        return ok({"name": self.model(request).name, "ready": self.is_ready})

    async def server_metadata(self, request: Request) -> Response:
        P.authorize(request.headers, self.auth_token)
        return ok(P.server_metadata(self.models, self.model_id))

    async def live(self, request: Request) -> Response:
        return ok({"live": True})

    async def ready(self, request: Request) -> Response:
        return ok({"ready": True}) if self.is_ready else error("not ready", 503)

    async def prometheus(self, request: Request) -> Response:
        in_flight = {name: lane.open_requests for name, lane in self.lanes.items()}
        return Response(self.metrics.render(in_flight), media_type="text/plain; version=0.0.4")

    def routes(self) -> list[Route]:
        get, post = ["GET"], ["POST"]
        return [Route("/v2/models/{name}/infer", self.infer, methods=post),       # the hot path first
                Route("/v2/models/{name}/versions/{version}/infer", self.infer, methods=post),
                Route("/v2/health/live", self.live, methods=get),
                Route("/v2/health/ready", self.ready, methods=get),
                Route("/v2", self.server_metadata, methods=get), Route("/metrics", self.prometheus, methods=get),
                Route("/v2/models/{name}", self.model_metadata, methods=get),
                Route("/v2/models/{name}/versions/{version}", self.model_metadata, methods=get),
                Route("/v2/models/{name}/ready", self.model_ready, methods=get),
                Route("/v2/models/{name}/versions/{version}/ready", self.model_ready, methods=get)]


async def request_error(request: Request, exc: P.RequestError) -> Response:
    return error(str(exc), exc.status, exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return error(f"{exc.detail}: {request.method} {request.url.path}", exc.status_code)


def create_app(export_dir: str | Path, *, provider: str = "auto", max_batch: int = 16,
               max_delay_ms: float = 2.0, auth_token: str | None = None, max_body_mb: float = 16.0,
               timeout_s: float = 10.0, threads: int | None = None, tail_dtype: str = "float32",
               keep_ratios: list[float] | None = None) -> Starlette:
    """The serve-tail ASGI app: one served model per exported keep ratio (or those asked for).
    Raises ManifestError (export folder) or ProviderError (provider) before serving anything."""
    models = P.served_models(export_dir, keep_ratios, tail_dtype)
    lanes = {name: Lane(m, m.load_tail(provider, threads)) for name, m in models.items()}
    model_id = next(iter(models.values())).model_id
    server = TailServer(lanes, model_id, max_batch=max_batch, max_delay_ms=max_delay_ms, auth_token=auth_token,
                        max_body=int(max_body_mb * 1024 * 1024), timeout_s=timeout_s)
    app = server.app()
    app.state.models, app.state.metrics, app.state.model_id = lanes, server.metrics, model_id
    return app


def run(app: Starlette, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 10.0) -> None:
    """uvicorn; SIGINT/SIGTERM stop accepting, let in-flight requests finish, then exit."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=max(5, int(timeout_s) + 1))


def serve(export_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    run(create_app(export_dir, **kw), host, port, kw.get("timeout_s", 10.0))


def free_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn(export_dir: str | Path, *args: str, port: int | None = None, ready_timeout: float = 60.0,
          log=None, cpus: set[int] | None = None):
    """Start `mercury-onnx serve-tail` in a subprocess on 127.0.0.1 and wait until it is ready.
    Returns (process, url). For tests and benchmarks; stop it with proc.terminate().
    `cpus` pins the server (all its threads) to those CPUs (Linux), as `taskset` would."""
    import subprocess
    import sys
    import urllib.request

    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mercury_onnx.cli", "serve-tail", str(export_dir),
                             "--port", str(port), *args],
                            stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-tail exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"serve-tail was not ready within {ready_timeout:g} s")
