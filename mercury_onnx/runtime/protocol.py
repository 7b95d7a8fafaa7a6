"""The tail's Open Inference Protocol (KServe v2 REST), apart from any web framework.

One implementation of the wire protocol for every engine that serves the tail (serve-tail's
Starlette app; a Ray Serve deployment). An engine reads the HTTP request, calls these
functions, and differs only in how a batch reaches onnxruntime:

    models = served_models(export_dir, keep_ratios, tail_dtype)  # {name: ServedModel} (served.py)
    authorize(headers, auth_token)                     # 401
    model = lookup(models, name, version)              # 404
    check_content_length(headers, max_body)            # 413 before reading the body
    check_body_size(len(body), max_body)               # 413 while streaming it
    req = decode_request(model, headers, body)         # 400 / 409: a checked InferRequest
    logits = run_batch(tail, [req, ...])               # one tail run, split back per request
    body, headers = encode_response(model, req, logits[0], {"tail_ms": ...})

Every refusal is a RequestError carrying the HTTP status, a metrics reason and any headers;
`error_body(str(e))` is its JSON body, {"error": "..."}.

The request: inputs `tokens` FP32 | FP16 | INT8 (then FP32 `scales` [B, P+K, 1]) and
`indices` INT64 | INT32 | INT16 [B, K], strictly ascending in [0, N); each as JSON `data` or
binary (`Inference-Header-Content-Length`, `binary_data_size`); `"parameters": {"model_id":
...}` equal to the export's (409 when it differs, 400 when missing). A codec model
(mercury_tail_k{K}_c{D}x{B}) takes instead one UINT8 input `payload` [L], the codec payload
of formats/codec_wire.py, or the raw `codes` UINT8 [B, P+K, d] + `indices` (what Triton's
copy of the codec tail takes); a payload or `"parameters": {"codec_id": ...}` of another
codec is refused with 409, like a model id. The response: `logits`
FP32 [B, C], as JSON `data`, or binary when the request sets `binary_data_output` or the
output's `binary_data`. numpy and the tail's onnxruntime session only: no torch, no web
framework.
"""
from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..formats import codec_wire
from .codec import cast, check_indices
# the model table lives in served.py; re-exported, it is part of this module's API
from .served import INDEX_TYPES, TOKEN_TYPES, ServedModel, served_models, server_metadata  # noqa: F401

DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16,
          "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8}
JSON_TYPE = "application/json"
HEADER_LENGTH = "inference-header-content-length"
REASONS = {401: "auth", 404: "unknown_model", 413: "too_large", 503: "shutdown", 504: "timeout"}


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status, `reason` the metrics label
    (mercury_errors_total), `headers` any the response must carry (WWW-Authenticate)."""

    def __init__(self, msg: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(msg)
        self.status, self.headers = status, headers or {}
        self.reason = REASONS.get(status, "bad_request")


def error_body(msg: str) -> bytes:
    return json.dumps({"error": msg}).encode()


# --------------------------------------------------------------------------- checks before the body
def authorize(headers: Mapping[str, str], token: str | None) -> None:
    """With a token set, the request must send 'Authorization: Bearer <token>' (401)."""
    if token is None:
        return
    got = headers.get("authorization", "")
    if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
        why = "missing" if not got else "invalid"
        raise RequestError(f"{why} bearer token: send 'Authorization: Bearer <token>'", 401,
                           {"WWW-Authenticate": "Bearer"})


def lookup(models: Mapping[str, ServedModel], name: str, version: str = "1") -> ServedModel:
    """The model a path names (404 for an unknown name or a version other than 1)."""
    if name not in models or version != "1":
        raise RequestError(f"unknown model {name!r} version {version}; served: {sorted(models)}", 404)
    return models[name]


def check_content_length(headers: Mapping[str, str], max_body: int) -> None:
    length = headers.get("content-length")
    if length is None:
        return
    if not length.isdigit():
        raise RequestError("bad Content-Length")
    if int(length) > max_body:
        raise RequestError(f"body of {int(length)} bytes exceeds the {max_body} byte limit (--max-body-mb)", 413)


def check_body_size(size: int, max_body: int) -> None:
    """For bodies read in chunks: call with the running total."""
    if size > max_body:
        raise RequestError(f"body exceeds the {max_body} byte limit (--max-body-mb)", 413)


# --------------------------------------------------------------------------- the request
@dataclass
class InferRequest:
    """A checked infer request, ready for the tail."""
    tokens: np.ndarray              # (b, P+K, D) contiguous, in the tail's io dtype, finite
    indices: np.ndarray             # (b, K) int64, strictly ascending in [0, N)
    binary_output: bool             # answer logits as binary data
    id: object = None               # the request's "id", echoed when present
    has_id: bool = False

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def decode_request(model: ServedModel, headers: Mapping[str, str], body: bytes) -> InferRequest:
    """A whole infer request body -> InferRequest, or RequestError (400; 409 for another
    export's model id). `headers` needs lower-case keys (Starlette's Headers ignore case)."""
    req, binary = split_body(headers.get(HEADER_LENGTH), body)
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be an object")
    sent = params.get("model_id")
    if sent is None:
        raise RequestError(f"missing model id: send \"parameters\": {{\"model_id\": ...}} with the "
                           "manifest's model_id, so head and tail are known to match")
    if sent != model.model_id:
        raise RequestError(f"model id {sent!r} does not match this server's export {model.model_id!r}: "
                           "the head that made these tokens belongs to another export", 409)
    binary_out = wants_binary(req)
    if model.codec:
        tokens, indices = prepare_codec(model, params, parse_inputs(req, binary))
    else:
        tokens, indices = prepare(model, parse_inputs(req, binary))
    return InferRequest(tokens, indices, binary_out, req.get("id"), "id" in req)


def split_body(header_length: str | None, body: bytes) -> tuple[dict, bytes]:
    """Body -> (the JSON request object, the binary tensor data after it)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError(f"Inference-Header-Content-Length {header_length!r} does not fit a "
                               f"{len(body)} byte body")
        head, binary = body[:int(header_length)], body[int(header_length):]
    else:
        head, binary = body, b""
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON in the request: {e}") from None
    if not isinstance(req, dict):
        raise RequestError("the request must be a JSON object")
    return req, binary


def _shape(spec: dict, name: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise RequestError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _binary_input(spec: dict, name: str, shape: list[int], dtype: np.dtype, binary: bytes,
                  offset: int) -> np.ndarray | None:
    """The input's slice of the binary data at `offset`, or None when it sent JSON data."""
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is None:
        return None
    count = math.prod(shape)                                         # exact, no int64 overflow
    if not isinstance(size, int) or size < 0:
        raise RequestError(f"input {name!r}: bad binary_data_size {size!r}")
    if size != count * dtype.itemsize:
        raise RequestError(f"input {name!r}: binary_data_size {size} does not match shape {shape} "
                           f"of {spec['datatype']} ({count * dtype.itemsize} bytes)")
    if offset + size > len(binary):
        raise RequestError(f"binary data truncated: input {name!r} needs bytes {offset}..{offset + size}, "
                           f"the body has {len(binary)} after the JSON header")
    return np.frombuffer(binary, dtype, count, offset).reshape(shape)


def _json_input(spec: dict, name: str, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if "data" not in spec:
        raise RequestError(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    try:
        arr = np.asarray(spec["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise RequestError(f"input {name!r}: data is not {spec['datatype']} numbers: {e}") from None
    count = math.prod(shape)
    if arr.size != count:
        raise RequestError(f"input {name!r}: {arr.size} values for shape {shape} ({count} expected)")
    return arr.reshape(shape)


def parse_inputs(req: dict, binary: bytes) -> dict[str, np.ndarray]:
    """The request's inputs -> {name: array} (JSON 'data' or binary_data_size slices)."""
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("request has no 'inputs' list")
    arrays, offset = {}, 0
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise RequestError("each input needs a 'name'")
        name, dt = spec["name"], spec.get("datatype")
        if name in arrays:
            raise RequestError(f"input {name!r} given twice")
        if dt not in DTYPES:
            raise RequestError(f"input {name!r}: datatype {dt!r} is not supported here (use one of {sorted(DTYPES)})")
        shape, dtype = _shape(spec, name), np.dtype(DTYPES[dt])
        arr = _binary_input(spec, name, shape, dtype, binary, offset)
        if arr is None:
            arr = _json_input(spec, name, shape, dtype)
        else:
            offset += arr.nbytes
        arrays[name] = arr
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data after the last input "
                           "(binary_data_size values do not add up to the body)")
    return arrays


def prepare(model: ServedModel, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Check names, dtypes, shapes, indices; dequantise/cast the tokens to the tail's io dtype."""
    unknown = set(arrays) - {"tokens", "indices", "scales"}
    if unknown:
        raise RequestError(f"unknown input(s) {sorted(unknown)}: {model.name} takes 'tokens', 'indices' "
                           "(and 'scales' with INT8 tokens)")
    for need in ("tokens", "indices"):
        if need not in arrays:
            raise RequestError(f"missing input {need!r}")
    tokens, indices, scales = arrays["tokens"], arrays["indices"], arrays.get("scales")
    if tokens.dtype.name not in ("float32", "float16", "int8"):
        raise RequestError(f"'tokens' must be FP32, FP16 or INT8 (with 'scales'), got {tokens.dtype.name.upper()}")
    if indices.dtype.name not in ("int64", "int32", "int16"):
        raise RequestError(f"'indices' must be INT64, INT32 or INT16, got {indices.dtype.name.upper()}")
    want = model.tokens_shape
    if tokens.ndim != 3 or tokens.shape[1:] != want or tokens.shape[0] < 1:
        raise RequestError(f"'tokens' shape {list(tokens.shape)}, expected [B, {want[0]}, {want[1]}] for {model.name}")
    b = tokens.shape[0]
    if list(indices.shape) != [b, model.keep]:
        raise RequestError(f"'indices' shape {list(indices.shape)}, expected [{b}, {model.keep}]")
    if tokens.dtype == np.int8:
        if scales is None:
            raise RequestError("INT8 'tokens' need an FP32 'scales' input [B, P+K, 1]")
        if scales.dtype != np.float32 or list(scales.shape) != [b, want[0], 1]:
            raise RequestError(f"'scales' must be FP32 [{b}, {want[0]}, 1], got "
                               f"{scales.dtype.name.upper()} {list(scales.shape)}")
        tokens = tokens.astype(np.float32) * scales
    elif scales is not None:
        raise RequestError("'scales' is only for INT8 tokens")
    check_indices(indices, model.num_patches, RequestError)
    tokens = np.ascontiguousarray(cast(tokens, model.io_dtype))
    if not np.isfinite(tokens).all():
        raise RequestError("'tokens' contain NaN or infinity")
    return tokens, indices.astype(np.int64)


def prepare_codec(model: ServedModel, params: dict, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A codec model's inputs -> codes uint8 (B, P+K, d), indices int64 (B, K). 409 for a
    payload or codec_id of another codec (device and server hold different codecs)."""
    c = model.codec
    sent = params.get("codec_id")
    if sent is not None and sent != c["codec_id"]:
        raise RequestError(f"codec id {sent!r} does not match {model.name}'s codec {c['name']} "
                           f"({c['codec_id']}): device and server hold different codecs (re-fetch the export)", 409)
    if set(arrays) == {"payload"}:
        data = arrays["payload"]
        if data.dtype != np.uint8 or data.ndim != 1:
            raise RequestError(f"'payload' must be UINT8 [L], got {data.dtype.name.upper()} {list(data.shape)}")
        try:
            h = codec_wire.read_header(data.tobytes())
            if h.model_id != model.model_id or h.codec_id != c["codec_id"]:
                what = (f"model {h.model_id}, this export is {model.model_id}" if h.model_id != model.model_id
                        else f"codec {h.codec_id}, {model.name} decodes {c['name']} ({c['codec_id']})")
                raise RequestError(f"payload is for {what}: device and server hold different "
                                   "exports or codecs (re-fetch the export)", 409)
            h, codes, indices = codec_wire.decode(data.tobytes(), model_id=model.model_id,
                                                  codec_id=c["codec_id"], dictionary=model.dictionary)
        except codec_wire.WireError as e:
            raise RequestError(f"bad codec payload: {e}") from None
        if (h.keep, h.dims, h.bits, h.num_patches) != (model.keep, c["dims"], c["bits"], model.num_patches) \
                or h.prefix + h.keep != model.tokens_shape[0]:
            raise RequestError(f"payload holds K={h.keep}, d={h.dims}, {h.bits} bits, N={h.num_patches}, "
                               f"P={h.prefix}; {model.name} takes K={model.keep}, d={c['dims']}, {c['bits']} bits")
        return codes, indices
    if set(arrays) != {"codes", "indices"}:
        raise RequestError(f"inputs {sorted(arrays)}: {model.name} takes 'payload' (UINT8 codec payload), "
                           "or 'codes' and 'indices'")
    codes, indices = arrays["codes"], arrays["indices"]
    b = codes.shape[0] if codes.ndim == 3 else 0
    if codes.dtype != np.uint8 or codes.ndim != 3 or codes.shape[1:] != model.tokens_shape or b < 1:
        raise RequestError(f"'codes' must be UINT8 [B, {model.tokens_shape[0]}, {model.tokens_shape[1]}], "
                           f"got {codes.dtype.name.upper()} {list(codes.shape)}")
    if indices.dtype.name not in ("int64", "int32", "int16") or list(indices.shape) != [b, model.keep]:
        raise RequestError(f"'indices' must be INT64 [{b}, {model.keep}], got "
                           f"{indices.dtype.name.upper()} {list(indices.shape)}")
    if c["bits"] < 8 and int(codes.max()) >> c["bits"]:
        raise RequestError(f"'codes' reach {int(codes.max())}; codec {c['name']} has {c['bits']} bits")
    check_indices(indices, model.num_patches, RequestError)
    return np.ascontiguousarray(codes), indices.astype(np.int64)


def wants_binary(req: dict) -> bool:
    """Whether the response carries logits as binary data; refuses outputs other than logits."""
    params = req.get("parameters") or {}
    binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outputs = req.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list):
        raise RequestError("'outputs' must be a list")
    for o in outputs:
        if not isinstance(o, dict) or o.get("name") != "logits":
            raise RequestError(f"unknown output {o.get('name') if isinstance(o, dict) else o!r}: "
                               "the only output is 'logits'")
        p = o.get("parameters") or {}
        if isinstance(p, dict) and "binary_data" in p:
            binary = bool(p["binary_data"])
        if isinstance(p, dict) and "classification" in p:
            raise RequestError("the classification extension is not supported; read 'logits'")
    return binary


# --------------------------------------------------------------------------- the tail and the answer
def run_batch(tail: Callable[[np.ndarray, np.ndarray], np.ndarray],
              requests: Sequence[InferRequest]) -> list[np.ndarray]:
    """One tail run over several requests (same model): their logits (b_i, C), in order."""
    if len(requests) == 1:
        return [tail(requests[0].tokens, requests[0].indices)]
    tokens = np.concatenate([r.tokens for r in requests])                # (sum b_i, P+K, D)
    indices = np.concatenate([r.indices for r in requests])              # (sum b_i, K)
    logits = tail(tokens, indices)                                       # (sum b_i, C)
    ends = np.cumsum([r.size for r in requests])
    return np.split(logits, ends[:-1])


def encode_response(model: ServedModel, req: InferRequest, logits: np.ndarray,
                    parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """The infer response -> (body, headers incl. Content-Type). `parameters` (timings,
    batch size) go into the response's parameters beside the model id."""
    out = {"name": "logits", "datatype": "FP32", "shape": list(logits.shape)}
    resp = {"model_name": model.name, "model_version": "1",
            "parameters": {**(parameters or {}), "model_id": model.model_id}, "outputs": [out]}
    if req.has_id:
        resp["id"] = req.id
    if not req.binary_output:
        out["data"] = logits.ravel().tolist()
        return json.dumps(resp).encode(), {"content-type": JSON_TYPE}
    data = np.ascontiguousarray(logits, dtype=np.float32).tobytes()
    out["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps(resp).encode()
    return header + data, {"content-type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(len(header))}
