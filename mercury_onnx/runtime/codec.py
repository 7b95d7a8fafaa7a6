"""The token payload: what the device sends the cloud, as compact, self-checking bytes.

    header (40 bytes, little-endian)
      magic b"MRCT" | u8 version | u8 token dtype | u8 index dtype | u8 reserved
      8 bytes model id (the manifest's 16 hex chars) | f32 keep ratio | u32 B | u32 K | u32 D
      | u32 N (patch tokens, for the index range check) | u32 P (prefix tokens; version 2)
    tokens   (B, P+K, D)  fp16, int8 or fp32
    scales   (B, P+K, 1)  f32, int8 tokens only: token = int8 * scale
    indices  (B, K)       int16 when N < 32768, else int32

P is the backbone's prefix tokens sent ahead of the K patch tokens: 1 (the CLS) for a plain
ViT/DeiT, 2 for a distilled DeiT, more with registers. Version 1 had a reserved 0 where
version 2 has P, and meant P = 1: a payload with P = 1 is still written as version 1, byte for
byte, so version-1 readers keep reading it, and they refuse one with P != 1 by its version.

Int8 is symmetric per token (scale = max|x| / 127), which is what the tok8 head emits too.
`pack` / `unpack` do the dtype work alone (the KServe client sends the packed arrays as
separate tensors); `encode` / `decode` add the header and bytes. numpy only (device side).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from importlib import resources

import numpy as np

MAGIC = b"MRCT"
VERSION = 2                                                           # written when P != 1
VERSIONS = (1, 2)                                                     # read
_HEADER = struct.Struct("<4sBBBB8sfIIIII")
HEADER_SIZE = _HEADER.size                                            # 40
TOKEN_DTYPES = {"fp16": (1, np.float16), "int8": (2, np.int8), "fp32": (3, np.float32)}
INDEX_DTYPES = {"int16": (1, np.int16), "int32": (2, np.int32)}
_TOKEN_BY_CODE = {code: name for name, (code, _) in TOKEN_DTYPES.items()}
_INDEX_BY_CODE = {code: name for name, (code, _) in INDEX_DTYPES.items()}


# float32 <-> float16 casts as one-node ONNX Cast graphs, package data built by
# tools/build_cast_graphs.py (read as bytes: the device needs no onnx package). ORT's Cast is
# SIMD (F16C) and bit-identical to numpy's astype (tests/runtime/test_codec.py).
CAST_GRAPHS = {("float32", "float16"): "cast_f32_f16.onnx", ("float16", "float32"): "cast_f16_f32.onnx"}
_cast_sessions: dict = {}


def cast(x: np.ndarray, dtype) -> np.ndarray:
    """x.astype(dtype), through onnxruntime for large float32 <-> float16 arrays."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    key = (x.dtype.name, dtype.name)
    if key not in CAST_GRAPHS or x.size < 4096:
        return x.astype(dtype)
    sess = _cast_sessions.get(key)
    if sess is None:
        try:
            import onnxruntime as ort
        except ImportError:
            return x.astype(dtype)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = (resources.files(__package__) / "graphs" / CAST_GRAPHS[key]).read_bytes()
        sess = _cast_sessions[key] = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ascontiguousarray(x)})[0]


class CodecError(ValueError):
    """The payload is not one we can decode (the message says what is wrong)."""


@dataclass
class Packed:
    """The wire form of one head output: tokens in the wire dtype, scales for int8, small indices."""
    tokens: np.ndarray              # (B, P+K, D) fp16 | int8 | fp32
    indices: np.ndarray             # (B, K) int16 | int32
    scales: np.ndarray | None       # (B, P+K, 1) float32, int8 only

    @property
    def token_dtype(self) -> str:
        return {np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8",
                np.dtype(np.float32): "fp32"}[self.tokens.dtype]

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.indices.nbytes + (0 if self.scales is None else self.scales.nbytes)


@dataclass
class Header:
    version: int
    token_dtype: str
    index_dtype: str
    model_id: str
    keep_ratio: float
    batch: int
    keep: int
    dim: int
    num_patches: int
    num_prefix_tokens: int = 1      # P


def index_dtype(num_patches: int) -> str:
    return "int16" if num_patches < 32768 else "int32"


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: (B, T, D) float -> int8 (B, T, D), scales float32 (B, T, 1)."""
    tokens = np.asarray(tokens, dtype=np.float32)
    amax = np.abs(tokens).max(axis=-1, keepdims=True)                 # (B, T, 1)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.rint(tokens / scales)
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scales


def pack(tokens: np.ndarray, indices: np.ndarray, num_patches: int, token_dtype: str = "fp16",
         scales: np.ndarray | None = None) -> Packed:
    """Head output -> wire arrays. Int8 tokens with their scales (a tok8 head) pass through."""
    if token_dtype not in TOKEN_DTYPES:
        raise CodecError(f"token dtype {token_dtype!r}: use one of {sorted(TOKEN_DTYPES)}")
    if tokens.ndim != 3 or indices.ndim != 2 or tokens.shape[0] != indices.shape[0] \
            or tokens.shape[1] < indices.shape[1]:
        raise CodecError(f"tokens {tokens.shape} and indices {indices.shape} are not (B, P+K, D) and (B, K)")
    idx = np.ascontiguousarray(indices, dtype=INDEX_DTYPES[index_dtype(num_patches)][1])
    if tokens.dtype == np.int8:
        if token_dtype != "int8" or scales is None:
            raise CodecError("int8 tokens need their scales and token_dtype='int8'")
        return Packed(np.ascontiguousarray(tokens), idx, np.ascontiguousarray(scales, dtype=np.float32))
    if token_dtype == "int8":
        q, s = quantize_int8(tokens)
        return Packed(q, idx, s)
    return Packed(np.ascontiguousarray(cast(tokens, TOKEN_DTYPES[token_dtype][1])), idx, None)


def unpack(p: Packed, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Wire arrays -> float tokens (B, P+K, D) in `dtype`, int64 indices (B, K)."""
    if p.scales is not None:
        tokens = (p.tokens.astype(np.float32) * p.scales).astype(dtype, copy=False)
    else:
        tokens = cast(p.tokens, dtype)
    return tokens, p.indices.astype(np.int64)


def encode(tokens: np.ndarray, indices: np.ndarray, *, model_id: str, keep_ratio: float,
           num_patches: int, token_dtype: str = "fp16", scales: np.ndarray | None = None) -> bytes:
    """Head output -> one payload (header + tokens [+ scales] + indices)."""
    p = pack(tokens, indices, num_patches, token_dtype, scales)
    try:
        mid = bytes.fromhex(model_id)
    except (ValueError, TypeError):
        mid = b""
    if len(mid) != 8:
        raise CodecError(f"model id {model_id!r} is not 16 hex characters (the manifest's model_id)")
    b, t, d = p.tokens.shape
    k = p.indices.shape[1]
    prefix = t - k
    header = _HEADER.pack(MAGIC, 1 if prefix == 1 else VERSION, TOKEN_DTYPES[p.token_dtype][0],
                          INDEX_DTYPES[index_dtype(num_patches)][0], 0, mid, keep_ratio,
                          b, k, d, num_patches, 0 if prefix == 1 else prefix)
    parts = [header, p.tokens.tobytes()]
    if p.scales is not None:
        parts.append(p.scales.tobytes())
    parts.append(p.indices.tobytes())
    return b"".join(parts)


def read_header(data: bytes) -> Header:
    if len(data) < HEADER_SIZE:
        raise CodecError(f"payload truncated: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    magic, ver, tcode, icode, _, mid, ratio, b, k, d, n, p = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}: not a Mercury token payload (expected {MAGIC!r})")
    if ver not in VERSIONS:
        raise CodecError(f"payload format version {ver}, this reader understands {VERSIONS}")
    if ver == 1:
        p = 1                                                         # reserved then: the CLS alone
    if tcode not in _TOKEN_BY_CODE:
        raise CodecError(f"unknown token dtype code {tcode}")
    if icode not in _INDEX_BY_CODE:
        raise CodecError(f"unknown index dtype code {icode}")
    if b == 0 or d == 0 or k == 0 or k > n:
        raise CodecError(f"bad sizes in header: B={b}, K={k}, D={d}, N={n}")
    return Header(ver, _TOKEN_BY_CODE[tcode], _INDEX_BY_CODE[icode], mid.hex(), ratio, b, k, d, n, p)


def decode_packed(data: bytes, expect_model_id: str | None = None) -> tuple[Header, Packed]:
    """Payload -> header and wire arrays (views on `data`, no copies), everything checked."""
    h = read_header(data)
    if expect_model_id is not None and h.model_id != expect_model_id:
        raise CodecError(f"payload is for model {h.model_id}, this export is {expect_model_id}: "
                         "head and tail come from different exports")
    tdt = np.dtype(TOKEN_DTYPES[h.token_dtype][1])
    idt = np.dtype(INDEX_DTYPES[h.index_dtype][1])
    t = h.num_prefix_tokens + h.keep
    n_tok, n_sc, n_idx = h.batch * t * h.dim * tdt.itemsize, 0, h.batch * h.keep * idt.itemsize
    if h.token_dtype == "int8":
        n_sc = h.batch * t * 4
    expected = HEADER_SIZE + n_tok + n_sc + n_idx
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise CodecError(f"payload {what}: {len(data)} bytes, expected {expected} for "
                         f"B={h.batch}, P={h.num_prefix_tokens}, K={h.keep}, D={h.dim}, {h.token_dtype} tokens")
    off = HEADER_SIZE
    tokens = np.frombuffer(data, tdt, h.batch * t * h.dim, off).reshape(h.batch, t, h.dim)
    off += n_tok
    scales = None
    if n_sc:
        scales = np.frombuffer(data, np.float32, h.batch * t, off).reshape(h.batch, t, 1)
        off += n_sc
    indices = np.frombuffer(data, idt, h.batch * h.keep, off).reshape(h.batch, h.keep)
    check_indices(indices, h.num_patches, CodecError)
    return h, Packed(tokens, indices, scales)


def decode(data: bytes, expect_model_id: str | None = None,
           dtype=np.float32) -> tuple[Header, np.ndarray, np.ndarray]:
    """Payload -> header, float tokens (B, P+K, D), int64 indices (B, K)."""
    h, p = decode_packed(data, expect_model_id)
    tokens, indices = unpack(p, dtype)
    return h, tokens, indices


def check_indices(indices: np.ndarray, num_patches: int, error=CodecError) -> None:
    """Indices must lie in [0, N) and be strictly ascending in each row (sorted, no repeats)."""
    if indices.size == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_patches:
        raise error(f"indices out of range: found {lo}..{hi}, valid 0..{num_patches - 1}")
    if indices.shape[1] > 1 and not (np.diff(indices, axis=1) > 0).all():
        raise error("indices must be strictly ascending in each row (sorted, no duplicates)")
