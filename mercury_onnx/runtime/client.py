"""The device side end to end: image -> head (local ORT) -> tokens over KServe v2 -> logits.

`KServeClient` is a small Open Inference Protocol (v2 REST) client over httpx with the
binary tensor data extension (no tritonclient on the device). `Client` runs the head,
packs the tokens (fp16, or int8 + scales; or, with a codec head, the codec payload of
formats/codec_wire.py as one UINT8 tensor), sends them, and returns the top-5 with a latency
breakdown; with fallback="local" it runs full.onnx on the device when the server cannot be
reached, errs (5xx) or answers too slowly. Every network call has a timeout.
numpy, onnxruntime, pillow, httpx only (the [edge] extra).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from ..formats import codec_wire
from ..formats.images import preprocess
from ..formats.manifest import ManifestError, load_manifest, variant
from . import codec as token_codec
from .head import FullModel, Head
from .tail import model_name

V2_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.int8): "INT8",
             np.dtype(np.uint8): "UINT8",
             np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64"}
NP_DTYPES = {v: k for k, v in V2_DTYPES.items()}


class ServerError(RuntimeError):
    """The server could not give an answer (unreachable, timed out, 5xx)."""


class RequestRejected(RuntimeError):
    """The server refused the request (4xx): a configuration problem, not a network one."""


def build_request(inputs: dict[str, np.ndarray], parameters: dict | None = None,
                  binary_output: bool = True) -> tuple[bytes, int]:
    """KServe v2 request with every input as binary data. Returns (body, JSON header length)."""
    specs, blobs = [], []
    for name, arr in inputs.items():
        arr = np.ascontiguousarray(arr)
        blobs.append(arr.tobytes())
        specs.append({"name": name, "datatype": V2_DTYPES[arr.dtype], "shape": list(arr.shape),
                      "parameters": {"binary_data_size": arr.nbytes}})
    req = {"inputs": specs, "outputs": [{"name": "logits", "parameters": {"binary_data": binary_output}}]}
    if parameters:
        req["parameters"] = parameters
    header = json.dumps(req).encode()
    return header + b"".join(blobs), len(header)


def parse_response(content: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """KServe v2 response (JSON, or JSON header + binary outputs) -> (JSON, outputs)."""
    hlen = int(header_length) if header_length is not None else len(content)
    resp = json.loads(content[:hlen])
    outputs, offset = {}, hlen
    for o in resp.get("outputs", []):
        dtype = NP_DTYPES[o["datatype"]]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(content, dtype, size // dtype.itemsize, offset)
            offset += size
        else:
            arr = np.asarray(o["data"], dtype)
        outputs[o["name"]] = arr.reshape(o["shape"])
    return resp, outputs


class KServeClient:
    """Minimal v2 REST client: health, metadata, binary infer. Raises ServerError / RequestRejected."""

    def __init__(self, url: str, timeout: float = 5.0, auth_token: str | None = None):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self.http = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers)

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self.http.request(method, self.url + path, **kw)
        except httpx.TimeoutException as e:
            raise ServerError(f"{self.url} did not answer within {self.http.timeout.read:g} s ({type(e).__name__})") from e
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach {self.url}: {e}") from e
        if r.status_code >= 400:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text[:200]
            err = RequestRejected if r.status_code < 500 and r.status_code not in (408, 429) else ServerError
            raise err(f"server answered {r.status_code}: {msg}")
        return r

    def ready(self) -> bool:
        try:
            return self._send("GET", "/v2/health/ready").status_code == 200
        except (ServerError, RequestRejected):
            return False

    def metadata(self, model: str) -> dict:
        return self._send("GET", f"/v2/models/{model}").json()

    def infer(self, model: str, inputs: dict[str, np.ndarray],
              parameters: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
        body, hlen = build_request(inputs, parameters)
        return self.infer_raw(model, body, hlen)

    def infer_raw(self, model: str, body: bytes, header_length: int) -> tuple[dict, dict[str, np.ndarray]]:
        r = self._send("POST", f"/v2/models/{model}/infer", content=body,
                       headers={"Inference-Header-Content-Length": str(header_length),
                                "Content-Type": "application/octet-stream"})
        try:
            return parse_response(r.content, r.headers.get("inference-header-content-length"))
        except (ValueError, KeyError, TypeError) as e:
            raise ServerError(f"unreadable response from {self.url}: {e}") from e


@dataclass
class Prediction:
    top5: list[tuple[str, float]]               # (label, probability), best first
    logits: np.ndarray                          # (C,)
    where: str                                  # "split" (head here, tail on the server) or "local"
    breakdown: dict = field(default_factory=dict)   # ms per stage, for the whole batch
    note: str = ""                              # why it fell back, if it did


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Client:
    """Split inference from the device: head here, tail on a serve-tail (or Triton) server."""

    def __init__(self, export_dir: str | Path, server_url: str, keep_ratio: float | None = None,
                 token_dtype: str = "fp16", fallback: str = "local", timeout: float = 5.0,
                 auth_token: str | None = None, threads: int | None = None, codec: str | None = None):
        if token_dtype not in token_codec.TOKEN_DTYPES:
            raise ValueError(f"token dtype {token_dtype!r}: use one of {sorted(token_codec.TOKEN_DTYPES)}")
        if fallback not in ("local", "none"):
            raise ValueError(f"fallback {fallback!r}: use local or none")
        self.export_dir, self.threads = Path(export_dir), threads
        self.manifest = load_manifest(export_dir)
        self.variant = variant(self.manifest, keep_ratio)
        # a head that already emits the wire dtype saves the cast (tok8: int8 + scales; tok16: fp16)
        kind = {"int8": "tok8", "fp16": "tok16"}.get(token_dtype)
        kind = kind if kind and self.variant.get(f"head_{kind}") else "fp32"
        self.head = Head(export_dir, self.variant["keep_ratio"], kind=kind, threads=threads, manifest=self.manifest,
                         codec=codec)
        self.codec, self.dictionary = self.head.codec, None
        if self.codec:
            try:
                self.dictionary = codec_wire.load_dictionary(export_dir, self.codec)
            except codec_wire.WireError as e:
                raise ManifestError(str(e)) from None
        self.token_dtype, self.fallback = token_dtype, fallback
        self.model = model_name(self.variant["keep_tokens"], self.codec["name"] if self.codec else None)
        self.classes = self.manifest.get("classes") or []
        self.server = KServeClient(server_url, timeout, auth_token)
        self._full: FullModel | None = None

    def close(self) -> None:
        self.server.close()

    def top5(self, logits: np.ndarray) -> list[list[tuple[str, float]]]:
        p = softmax(logits.astype(np.float64))
        order = np.argsort(-p, axis=-1)[:, :5]
        name = lambda c: self.classes[c] if c < len(self.classes) else str(c)   # noqa: E731
        return [[(name(int(c)), float(row[c])) for c in o] for row, o in zip(p, order)]

    def predict(self, images) -> list[Prediction]:
        """Paths / PIL images -> one Prediction each. Raises ServerError with fallback='none'."""
        start = time.perf_counter()
        x = preprocess(images, self.manifest["preprocess"])             # (B, 3, H, W)
        ms = {"preprocess": (time.perf_counter() - start) * 1000}
        try:
            logits, split_ms = self.split(x)
            ms.update(split_ms)
            where, note = "split", ""
        except ServerError as e:
            if self.fallback == "none":
                raise
            t = time.perf_counter()
            if self._full is None:
                self._full = FullModel(self.export_dir, self.threads, self.manifest)
            logits = self._full(x)
            ms["local_full"] = (time.perf_counter() - t) * 1000
            where, note = "local", f"server unavailable ({e}); ran full.onnx on this device"
        ms["total"] = (time.perf_counter() - start) * 1000
        return [Prediction(top, lg, where, dict(ms), note) for top, lg in zip(self.top5(logits), logits)]

    def split(self, x: np.ndarray) -> tuple[np.ndarray, dict]:
        """Head here, tail on the server: (B, 3, H, W) -> logits (B, C), ms per stage."""
        t0 = time.perf_counter()
        out = self.head(x)
        t1 = time.perf_counter()
        params = {"model_id": self.manifest["model_id"]}
        if self.codec:
            c = self.codec
            payload = codec_wire.encode(out["codes"], out["indices"], self.manifest["num_patches"], c["bits"],
                                        self.manifest["model_id"], c["codec_id"], self.dictionary)
            inputs = {"payload": np.frombuffer(payload, np.uint8)}
            params["codec_id"] = c["codec_id"]
        else:
            p = token_codec.pack(out["tokens"], out["indices"], self.manifest["num_patches"],
                           self.token_dtype, out.get("scales"))
            inputs = {"tokens": p.tokens, "indices": p.indices}
            if p.scales is not None:
                inputs["scales"] = p.scales
        body, hlen = build_request(inputs, params)
        t2 = time.perf_counter()
        resp, outputs = self.server.infer_raw(self.model, body, hlen)
        t3 = time.perf_counter()
        params = resp.get("parameters") or {}
        ms = {"head": (t1 - t0) * 1000, "encode": (t2 - t1) * 1000, "round_trip": (t3 - t2) * 1000,
              "server_tail": float(params.get("tail_ms", float("nan"))),
              "server_queue": float(params.get("queue_ms", float("nan"))),
              "server_total": float(params.get("server_ms", float("nan"))),
              "payload_bytes": len(body)}
        if self.codec:
            ms["codec_payload_bytes"] = inputs["payload"].size
        return outputs["logits"].astype(np.float32), ms
