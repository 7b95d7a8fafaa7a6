"""serve-tail: the tail behind the Open Inference Protocol (KServe v2) REST API.

Endpoints: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/ready],
POST /v2/models/{name}[/versions/1]/infer, GET /metrics (Prometheus text).

- JSON tensors and the binary tensor data extension (`Inference-Header-Content-Length`,
  `binary_data_size`, `binary_data` / `binary_data_output`), so tritonclient.http works.
- One model per keep ratio, named mercury_tail_k{K}; requests carry the manifest's model id
  as `"parameters": {"model_id": ...}` and are refused when it differs.
- Dynamic batching: one asyncio queue per model; a batcher takes up to --max-batch images,
  waiting at most --max-delay-ms for more (not at all once every open request is in and the
  batch is as big as the previous one, e.g. a lone request under light load),
  runs ORT in a worker thread, and splits the logits back to the requests.
- Every bad request is a 4xx with {"error": "..."}; the server stays up and ready.
A plain Starlette app (FastAPI's per-request parameter solving and middleware cost about as
much CPU as the handler itself, and nothing here needs them) under uvicorn ([cloud] extra);
numpy, onnxruntime; no torch.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
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

from ..formats.manifest import load_manifest, variant
from .codec import cast, check_indices
from .tail import Tail

DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16,
          "INT32": np.int32, "INT64": np.int64}
TOKEN_TYPES, INDEX_TYPES = ("FP32", "FP16", "INT8"), ("INT64", "INT32", "INT16")
JSON_TYPE = "application/json"


class BadRequest(Exception):
    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


def error(msg: str, status: int) -> Response:
    return Response(json.dumps({"error": msg}), status, media_type=JSON_TYPE)


def ok(obj: dict) -> Response:
    return Response(json.dumps(obj), 200, media_type=JSON_TYPE)


# --------------------------------------------------------------------------- metrics
class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = list(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        lines = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}',
                  f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.count}"]
        return lines


class Metrics:
    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self, max_batch: int):
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch: dict[str, Histogram] = {}
        self.tail: dict[str, Histogram] = {}
        self.batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})

    def request(self, model: str, status: int, seconds: float) -> None:
        self.requests[model, status] = self.requests.get((model, status), 0) + 1
        self.latency.setdefault(model, Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def error(self, model: str, reason: str) -> None:
        self.errors[model, reason] = self.errors.get((model, reason), 0) + 1

    def batch_run(self, model: str, size: int, seconds: float) -> None:
        self.batch.setdefault(model, Histogram(self.batch_buckets)).observe(size)
        self.tail.setdefault(model, Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def render(self, in_flight: dict[str, int] | None = None) -> str:
        out = ["# HELP mercury_requests_in_flight Inference requests being handled now.",
               "# TYPE mercury_requests_in_flight gauge"]
        out += [f'mercury_requests_in_flight{{model="{m}"}} {n}' for m, n in sorted((in_flight or {}).items())]
        out += ["# HELP mercury_requests_total Inference requests by model and HTTP status.",
               "# TYPE mercury_requests_total counter"]
        out += [f'mercury_requests_total{{model="{m}",status="{s}"}} {n}' for (m, s), n in sorted(self.requests.items())]
        out += ["# HELP mercury_errors_total Failed inference requests by reason.",
                "# TYPE mercury_errors_total counter"]
        out += [f'mercury_errors_total{{model="{m}",reason="{r}"}} {n}' for (m, r), n in sorted(self.errors.items())]
        for name, help_, hists in (
                ("mercury_request_latency_seconds", "Request latency inside the server.", self.latency),
                ("mercury_batch_size", "Images per tail run (dynamic batching).", self.batch),
                ("mercury_tail_seconds", "Tail compute time per batch.", self.tail)):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
            for m, h in sorted(hists.items()):
                out += h.render(name, f'model="{m}"')
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- models
@dataclass
class Job:
    tokens: np.ndarray              # (b, 1+K, D) in the tail's io dtype
    indices: np.ndarray             # (b, K) int64
    future: asyncio.Future
    t0: float

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


@dataclass
class ServedModel:
    tail: Tail
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    open_requests: int = 0          # in the handler now: parsing, queued or running
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))

    @property
    def name(self) -> str:
        return self.tail.name

    def metadata(self) -> dict:
        t = self.tail
        tok = "FP16" if t.io_dtype == np.float16 else "FP32"
        return {"name": t.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "tokens", "datatype": tok, "shape": [-1, 1 + t.keep, t.dim]},
                           {"name": "indices", "datatype": "INT64", "shape": [-1, t.keep]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, t.num_classes or -1]}],
                "parameters": {"model_id": t.manifest["model_id"], "keep_ratio": t.variant["keep_ratio"],
                               "keep_tokens": t.keep, "num_patches": t.num_patches,
                               "accepts": {"tokens": list(TOKEN_TYPES), "indices": list(INDEX_TYPES),
                                           "scales": "FP32 [-1, 1+K, 1] with INT8 tokens"}}}


# --------------------------------------------------------------------------- request parsing
def _shape(spec: dict, name: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def parse_inputs(req: dict, binary: bytes) -> dict[str, np.ndarray]:
    """KServe v2 request inputs -> numpy arrays (JSON 'data' or binary_data_size slices)."""
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request has no 'inputs' list")
    arrays, offset = {}, 0
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest("each input needs a 'name'")
        name, dt = spec["name"], spec.get("datatype")
        if name in arrays:
            raise BadRequest(f"input {name!r} given twice")
        if dt not in DTYPES:
            raise BadRequest(f"input {name!r}: datatype {dt!r} is not supported here (use one of {sorted(DTYPES)})")
        shape, dtype = _shape(spec, name), np.dtype(DTYPES[dt])
        count = math.prod(shape)                                     # exact, no int64 overflow
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise BadRequest(f"input {name!r}: bad binary_data_size {size!r}")
            if size != count * dtype.itemsize:
                raise BadRequest(f"input {name!r}: binary_data_size {size} does not match shape {shape} "
                                 f"of {dt} ({count * dtype.itemsize} bytes)")
            if offset + size > len(binary):
                raise BadRequest(f"binary data truncated: input {name!r} needs bytes {offset}..{offset + size}, "
                                 f"the body has {len(binary)} after the JSON header")
            arr = np.frombuffer(binary, dtype, count, offset).reshape(shape)
            offset += size
        else:
            if "data" not in spec:
                raise BadRequest(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
            try:
                arr = np.asarray(spec["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError) as e:
                raise BadRequest(f"input {name!r}: data is not {dt} numbers: {e}") from None
            if arr.size != count:
                raise BadRequest(f"input {name!r}: {arr.size} values for shape {shape} ({count} expected)")
            arr = arr.reshape(shape)
        arrays[name] = arr
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data after the last input "
                         "(binary_data_size values do not add up to the body)")
    return arrays


def prepare(model: ServedModel, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Check names, dtypes, shapes, indices; dequantise/cast to the tail's io dtype."""
    t = model.tail
    unknown = set(arrays) - {"tokens", "indices", "scales"}
    if unknown:
        raise BadRequest(f"unknown input(s) {sorted(unknown)}: {model.name} takes 'tokens', 'indices' "
                         "(and 'scales' with INT8 tokens)")
    for need in ("tokens", "indices"):
        if need not in arrays:
            raise BadRequest(f"missing input {need!r}")
    tokens, indices, scales = arrays["tokens"], arrays["indices"], arrays.get("scales")
    if tokens.dtype.name not in ("float32", "float16", "int8"):
        raise BadRequest(f"'tokens' must be FP32, FP16 or INT8 (with 'scales'), got {tokens.dtype.name.upper()}")
    if indices.dtype.name not in ("int64", "int32", "int16"):
        raise BadRequest(f"'indices' must be INT64, INT32 or INT16, got {indices.dtype.name.upper()}")
    want = (1 + t.keep, t.dim)
    if tokens.ndim != 3 or tokens.shape[1:] != want or tokens.shape[0] < 1:
        raise BadRequest(f"'tokens' shape {list(tokens.shape)}, expected [B, {want[0]}, {want[1]}] for {model.name}")
    b = tokens.shape[0]
    if list(indices.shape) != [b, t.keep]:
        raise BadRequest(f"'indices' shape {list(indices.shape)}, expected [{b}, {t.keep}]")
    if tokens.dtype == np.int8:
        if scales is None:
            raise BadRequest("INT8 'tokens' need an FP32 'scales' input [B, 1+K, 1]")
        if scales.dtype != np.float32 or list(scales.shape) != [b, 1 + t.keep, 1]:
            raise BadRequest(f"'scales' must be FP32 [{b}, {1 + t.keep}, 1], got "
                             f"{scales.dtype.name.upper()} {list(scales.shape)}")
        tokens = tokens.astype(np.float32) * scales
    elif scales is not None:
        raise BadRequest("'scales' is only for INT8 tokens")
    check_indices(indices, t.num_patches, BadRequest)
    tokens = np.ascontiguousarray(cast(tokens, t.io_dtype))
    if not np.isfinite(tokens).all():
        raise BadRequest("'tokens' contain NaN or infinity")
    return tokens, indices.astype(np.int64)


def wants_binary(req: dict) -> bool:
    params = req.get("parameters") or {}
    binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outputs = req.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list")
    for o in outputs:
        if not isinstance(o, dict) or o.get("name") != "logits":
            raise BadRequest(f"unknown output {o.get('name') if isinstance(o, dict) else o!r}: the only output is 'logits'")
        p = o.get("parameters") or {}
        if isinstance(p, dict) and "binary_data" in p:
            binary = bool(p["binary_data"])
        if isinstance(p, dict) and "classification" in p:
            raise BadRequest("the classification extension is not supported; read 'logits'")
    return binary


# --------------------------------------------------------------------------- the app
def create_app(export_dir: str | Path, *, provider: str = "auto", max_batch: int = 16,
               max_delay_ms: float = 2.0, auth_token: str | None = None, max_body_mb: float = 16.0,
               timeout_s: float = 10.0, threads: int | None = None, tail_dtype: str = "float32",
               keep_ratios: list[float] | None = None) -> Starlette:
    """The serve-tail ASGI app: one served model per exported keep ratio (or those asked for)."""
    manifest = load_manifest(export_dir)
    entries = manifest["variants"] if not keep_ratios else [variant(manifest, r) for r in keep_ratios]
    tails = [Tail(export_dir, provider=provider, dtype=tail_dtype, threads=threads,
                  manifest=manifest, variant_entry=v) for v in entries]
    model_id = manifest["model_id"]
    max_body = int(max_body_mb * 1024 * 1024)
    metrics = Metrics(max_batch)
    state = {"ready": False}
    models = {t.name: ServedModel(t) for t in tails}   # asyncio.Queue binds its loop on first use

    async def batcher(m: ServedModel) -> None:
        loop = asyncio.get_running_loop()
        carry: Job | None = None
        last_jobs = 1
        while True:
            first = carry or await m.queue.get()
            carry = None
            jobs, n = [first], first.size
            deadline = loop.time() + max_delay_ms / 1000
            while n < max_batch:
                if m.queue.empty():
                    # every open request is in, and the batch is as big as the last one (a lone
                    # request under light load; a full round of closed-loop clients under load):
                    # waiting longer would only wait for requests nobody has sent yet
                    if len(jobs) >= m.open_requests and len(jobs) >= last_jobs:
                        break
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(m.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                else:
                    job = m.queue.get_nowait()
                if n + job.size > max_batch:
                    carry = job
                    break
                jobs.append(job)
                n += job.size
            last_jobs = len(jobs)
            jobs = [j for j in jobs if not j.future.done()]   # timed out while queued
            if not jobs:
                continue
            tokens = np.concatenate([j.tokens for j in jobs]) if len(jobs) > 1 else jobs[0].tokens
            indices = np.concatenate([j.indices for j in jobs]) if len(jobs) > 1 else jobs[0].indices
            t0 = time.perf_counter()
            try:
                logits = await loop.run_in_executor(m.pool, m.tail, tokens, indices)
            except Exception as e:   # noqa: BLE001 - report to the requests, keep serving
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            dt = time.perf_counter() - t0
            metrics.batch_run(m.name, len(tokens), dt)
            start = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result((logits[start:start + j.size], dt, len(tokens), t0 - j.t0))
                start += j.size

    @asynccontextmanager
    async def lifespan(app):
        for m in models.values():    # warm up: the first ORT run allocates and is slow
            t = m.tail
            await asyncio.get_running_loop().run_in_executor(
                m.pool, t, np.zeros((1, 1 + t.keep, t.dim), t.io_dtype), np.arange(t.keep)[None])
        tasks = [asyncio.create_task(batcher(m)) for m in models.values()]
        state["ready"] = True
        yield
        state["ready"] = False
        for task in tasks:
            task.cancel()
        for m in models.values():
            while not m.queue.empty():
                j = m.queue.get_nowait()
                if not j.future.done():
                    j.future.set_exception(BadRequest("server shutting down", 503))
            m.pool.shutdown(wait=True)

    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(f"{exc.detail}: {request.method} {request.url.path}", exc.status_code)

    def unauthorized(request: Request) -> Response | None:
        if auth_token is None:
            return None
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {auth_token}".encode()):
            why = "missing" if not got else "invalid"
            r = error(f"{why} bearer token: send 'Authorization: Bearer <token>'", 401)
            r.headers["WWW-Authenticate"] = "Bearer"
            return r
        return None

    async def live(request: Request):
        return ok({"live": True})

    async def ready(request: Request):
        return ok({"ready": True}) if state["ready"] else error("not ready", 503)

    async def server_metadata(request: Request):
        return unauthorized(request) or ok({"name": "mercury-serve-tail", "version": "1",
                                            "extensions": ["binary_tensor_data"], "model_id": model_id,
                                            "models": sorted(models)})

    def resolve(request: Request):
        """Auth, then the model the path names: (name, model, None, None), or
        (name, None, error response, metrics reason) for the three endpoints that take a model."""
        name, version = request.path_params["name"], request.path_params.get("version", "1")
        if (r := unauthorized(request)) is not None:
            return name, None, r, "auth"
        if name not in models or version != "1":
            return name, None, error(f"unknown model {name!r} version {version}; served: {sorted(models)}",
                                     404), "unknown_model"
        return name, models[name], None, None

    async def model_metadata(request: Request):
        _, m, r, _ = resolve(request)
        return r or ok(m.metadata())

    async def model_ready(request: Request):
        name, m, r, _ = resolve(request)
        return r or ok({"name": name, "ready": state["ready"]})

    async def prometheus(request: Request):
        in_flight = {name: m.open_requests for name, m in models.items()}
        return Response(metrics.render(in_flight), media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise BadRequest("bad Content-Length")
            if int(length) > max_body:
                raise BadRequest(f"body of {int(length)} bytes exceeds the {max_body} byte limit (--max-body-mb)", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise BadRequest(f"body exceeds the {max_body} byte limit (--max-body-mb)", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer_one(request: Request, m: ServedModel, t_start: float) -> Response:
        body = await read_body(request)
        hlen = request.headers.get("inference-header-content-length")
        if hlen is not None:
            if not hlen.isdigit() or int(hlen) > len(body):
                raise BadRequest(f"Inference-Header-Content-Length {hlen!r} does not fit a {len(body)} byte body")
            head, binary = body[:int(hlen)], body[int(hlen):]
        else:
            head, binary = body, b""
        try:
            req = json.loads(head)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON in the request: {e}") from None
        if not isinstance(req, dict):
            raise BadRequest("the request must be a JSON object")
        params = req.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("'parameters' must be an object")
        sent = params.get("model_id")
        if sent is None:
            raise BadRequest(f"missing model id: send \"parameters\": {{\"model_id\": ...}} with the "
                             "manifest's model_id, so head and tail are known to match")
        if sent != model_id:
            raise BadRequest(f"model id {sent!r} does not match this server's export {model_id!r}: "
                             "the head that made these tokens belongs to another export", 409)
        binary_out = wants_binary(req)
        tokens, indices = prepare(m, parse_inputs(req, binary))

        loop = asyncio.get_running_loop()
        job = Job(tokens, indices, loop.create_future(), time.perf_counter())
        m.queue.put_nowait(job)
        timer = loop.call_later(timeout_s, lambda: job.future.done() or job.future.set_exception(
            BadRequest(f"inference took longer than the server's {timeout_s:g} s timeout", 504)))
        try:
            logits, tail_s, batch, queue_s = await job.future
        finally:
            timer.cancel()

        out = {"name": "logits", "datatype": "FP32", "shape": list(logits.shape)}
        resp = {"model_name": m.name, "model_version": "1",
                "parameters": {"tail_ms": round(tail_s * 1000, 3), "queue_ms": round(queue_s * 1000, 3),
                               "batch_size": batch, "model_id": model_id,
                               "server_ms": round((time.perf_counter() - t_start) * 1000, 3)},
                "outputs": [out]}
        if "id" in req:
            resp["id"] = req["id"]
        if not binary_out:
            out["data"] = logits.ravel().tolist()
            return ok(resp)
        data = np.ascontiguousarray(logits, dtype=np.float32).tobytes()
        out["parameters"] = {"binary_data_size": len(data)}
        header = json.dumps(resp).encode()
        return Response(header + data, 200, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(header))})

    async def infer(request: Request):
        t0 = time.perf_counter()
        name, m, response, reason = resolve(request)
        label = name if name in models else "_unknown"
        if response is not None:
            metrics.error(label, reason)
        else:
            m.open_requests += 1
            try:
                response = await infer_one(request, m, t0)
            except BadRequest as e:
                response = error(str(e), e.status)
                metrics.error(label, {413: "too_large", 504: "timeout", 503: "shutdown"}.get(e.status, "bad_request"))
            except Exception as e:   # noqa: BLE001 - an ORT failure: a 500, the server keeps going
                response = error(f"inference failed: {type(e).__name__}: {e}", 500)
                metrics.error(label, "internal")
            finally:
                m.open_requests -= 1
        metrics.request(label, response.status_code, time.perf_counter() - t0)
        return response

    get = ["GET"]
    routes = [Route("/v2/models/{name}/infer", infer, methods=["POST"]),       # the hot path first
              Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
              Route("/v2/health/live", live, methods=get), Route("/v2/health/ready", ready, methods=get),
              Route("/v2", server_metadata, methods=get), Route("/metrics", prometheus, methods=get),
              Route("/v2/models/{name}", model_metadata, methods=get),
              Route("/v2/models/{name}/versions/{version}", model_metadata, methods=get),
              Route("/v2/models/{name}/ready", model_ready, methods=get),
              Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=get)]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={StarletteHTTPException: http_error})
    app.state.models, app.state.metrics, app.state.model_id = models, metrics, model_id

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
