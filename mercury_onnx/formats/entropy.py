"""The body of an entropy codec's payload (eP codecs, models/codec.py): static per-channel coding.

An eP codec sends codes c = q + 128 (q a signed step count) on every kept principal channel,
one step for all of them give or take a factor, so the channels differ in entropy by a lot:
from ~0.3 bit per code (a quiet channel, mostly 0) to ~7 (the first principal channels). One
zstd stream over all of them codes the mixture of their distributions; a per-channel static
coder is what reaches the sum of their entropies. numpy has no arithmetic coder, and a Python
loop over 38,400 codes (DeiT-B, K=49) costs tens of ms, so the coder is two vectorised parts:

- Rice channels (calibration says a Rice parameter k >= 1 fits them): v = zigzag(q) as a
  unary part v >> k (that many 0 bits, then a 1) in one bit stream and the k low bits in
  another (grouped by k). Both decode with numpy alone: the unary stream by the positions of
  its 1 bits, the low bits by their fixed widths. On busy channels (several bits per code) a
  Rice code is close to the entropy of a two-sided geometric-like distribution.
- zstd channels (the quiet ones, k = 0, where a Rice code would spend >= 1 bit on every 0):
  their unary bits, channel-major, through zstd with a dictionary trained on calibration
  codes. A mostly-ones bit stream packs into few, repetitive byte values, which zstd's Huffman
  and match coding model well; in the exploration behind this design that came closer to these
  channels' entropy than zstd over one byte (or one nibble) per code. The bytes against the
  codes' entropy are in docs/results/codec.md (benchmarks/codec_photos.py).

The tables (per-channel k, which channels are zstd's, the dictionary) are fit on calibration
codes (`train_tables`) and travel in the export as the codec's dictionary file:

    b"MCET" | u8 version | u16 d | d bytes: k per channel (255 = zstd channel) | zstd dictionary

Body: varint n | zstd frame (magicless, n bytes) | Rice low bits | Rice unary bits, whose
sizes follow from the tables and the decoded values; the codec_wire header and CRC-32 around
it catch corruption first, and the decoder checks every length again.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import zstandard as zstd

MAGIC = b"MCET"
VERSION = 1
ZSTD_CHANNEL = 255
MAX_K = 12
LEVEL = 9               # measured: level 19 saves ~1% of the zstd part for 5x its time (0.5 ms)
_HEAD = struct.Struct("<4sBH")


class EntropyError(ValueError):
    """Tables or a body that cannot be used (the message says what is wrong)."""


@dataclass
class Tables:
    rice: np.ndarray       # (d,) uint8: Rice parameter per channel, ZSTD_CHANNEL for zstd's
    zdict: bytes           # zstd dictionary of the zstd channels ('' = none)

    @property
    def dims(self) -> int:
        return len(self.rice)


def zigzag(codes: np.ndarray) -> np.ndarray:
    """uint8 codes q + 128 -> uint16 zigzag(q): 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    q = codes.astype(np.int16) - 128
    return ((q << 1) ^ (q >> 15)).astype(np.uint16)


def unzigzag(v: np.ndarray) -> np.ndarray:
    """Inverse of zigzag -> uint8 codes; EntropyError if one falls outside 0..255."""
    v = v.astype(np.int64)                                  # decoded values can be anything: no wrap-around
    q = (v >> 1) ^ -(v & 1)
    if q.size and (q.min() < -128 or q.max() > 127):
        raise EntropyError("body decodes to codes outside 0..255 (corrupt payload)")
    return (q + 128).astype(np.uint8)


def rice_parameters(zz: np.ndarray) -> np.ndarray:
    """Per channel of zigzag values (M, d): the Rice k with the fewest bits, ZSTD_CHANNEL where k = 0."""
    cost = np.stack([((zz >> k) + 1 + k).sum(0) for k in range(MAX_K + 1)])   # (k, d)
    k = cost.argmin(0).astype(np.uint8)
    return np.where(k == 0, ZSTD_CHANNEL, k).astype(np.uint8)


def _unary(v: np.ndarray) -> np.ndarray:
    """Values (n,) -> their unary codes as bits: v zeros then a 1 each, uint8 (sum(v) + n,)."""
    bits = np.zeros(int(v.sum(dtype=np.int64)) + len(v), np.uint8)
    bits[np.cumsum(v.astype(np.int64) + 1) - 1] = 1
    return bits


def _from_unary(bits: np.ndarray, n: int, what: str) -> np.ndarray:
    """Inverse of _unary on a packed, zero-padded stream: the n values, int64."""
    ones = np.flatnonzero(bits.view(bool))                  # on bool: ~5x faster than on uint8 (measured)
    if len(ones) != n or (n and len(bits) - ones[-1] > 8):
        raise EntropyError(f"body's {what} part holds {len(ones)} codes, expected {n} (truncated or corrupt)")
    return np.diff(ones, prepend=-1) - 1


def train_tables(codes: np.ndarray, dict_size: int = 8192) -> bytes:
    """Tables for an eP codec from the codes of calibration images: uint8 (M, P+K, d)."""
    codes = np.asarray(codes, np.uint8)
    m, t, d = codes.shape
    zz = zigzag(codes)
    rice = rice_parameters(zz.reshape(-1, d))
    zch = rice == ZSTD_CHANNEL
    zdict = b""
    if zch.any() and m >= 16:
        samples = [np.packbits(_unary(img[:, zch].T.reshape(-1))).tobytes() for img in zz]   # as encode_body
        size = min(dict_size, max(256, sum(map(len, samples)) // 4))
        try:
            zdict = zstd.train_dictionary(size, samples, level=LEVEL).as_bytes()
        except zstd.ZstdError:
            zdict = b""                                                       # too little data: none
    return _HEAD.pack(MAGIC, VERSION, d) + rice.tobytes() + zdict


_tables: dict = {}


def read_tables(blob: bytes) -> Tables:
    """Parse (and cache) a tables blob; EntropyError when it is not one."""
    t = _tables.get(blob)
    if t is not None:
        return t
    if len(blob) < _HEAD.size or blob[:4] != MAGIC:
        raise EntropyError("not an entropy codec's tables (bad magic)")
    _, ver, d = _HEAD.unpack_from(blob)
    if ver != VERSION or len(blob) < _HEAD.size + d:
        raise EntropyError(f"entropy tables version {ver} or size {len(blob)} not understood")
    rice = np.frombuffer(blob, np.uint8, d, _HEAD.size).copy()
    if ((rice > MAX_K) & (rice != ZSTD_CHANNEL)).any():
        raise EntropyError("entropy tables hold a Rice parameter out of range (damaged file?)")
    zdict = blob[_HEAD.size + d:]
    t = _tables[blob] = Tables(rice, zdict)
    return t


_cctx: dict = {}
_dctx: dict = {}


def compressor(dictionary: bytes | None, level: int) -> zstd.ZstdCompressor:
    """A cached zstd compressor writing bare frames (magicless, no checksum, content size or
    dictionary id: every byte counts), with `dictionary` when given (codec_wire's too)."""
    c = _cctx.get((dictionary, level))
    if c is None:
        params = zstd.ZstdCompressionParameters.from_level(level, format=zstd.FORMAT_ZSTD1_MAGICLESS,
                                                           write_checksum=0, write_content_size=0, write_dict_id=0)
        c = _cctx[(dictionary, level)] = zstd.ZstdCompressor(
            dict_data=zstd.ZstdCompressionDict(dictionary) if dictionary else None, compression_params=params)
    return c


def decompressor(dictionary: bytes | None) -> zstd.ZstdDecompressor:
    """The cached reader of compressor()'s frames."""
    d = _dctx.get(dictionary)
    if d is None:
        d = _dctx[dictionary] = zstd.ZstdDecompressor(
            dict_data=zstd.ZstdCompressionDict(dictionary) if dictionary else None, format=zstd.FORMAT_ZSTD1_MAGICLESS)
    return d


def varint(n: int) -> bytes:
    """LEB128: 7 bits per byte, low first, high bit = more (codec_wire's header uses it too)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(data: bytes, off: int, error=EntropyError, what: str = "the body's length field") -> tuple[int, int]:
    """-> (value, offset after it); `error` when it does not end within 5 bytes or the data."""
    n = shift = 0
    for i in range(off, min(off + 5, len(data))):
        n |= (data[i] & 0x7F) << shift
        shift += 7
        if not data[i] & 0x80:
            return n, i + 1
    raise error(f"payload truncated or corrupt: {what} at byte {off} does not end")


_layouts: dict = {}


def _layout(tables: Tables, batch: int, tokens: int) -> tuple:
    """Per (tables, B, T), cached: where the zstd and the Rice values sit in the flat channel-
    major (B, d, T) array, each Rice value's k, and the Rice values grouped by k (the low bits
    are written group by group at a fixed width, which packs and unpacks without masks)."""
    key = (id(tables), batch, tokens)
    lay = _layouts.get(key)
    if lay is None or lay[0] is not tables:
        zch = np.repeat(np.tile(tables.rice == ZSTD_CHANNEL, batch), tokens)          # (B*d*T,)
        zpos, rpos = np.flatnonzero(zch), np.flatnonzero(~zch)
        k = np.repeat(np.tile(tables.rice[tables.rice != ZSTD_CHANNEL], batch), tokens).astype(np.int64)
        groups = [(int(kv), np.flatnonzero(k == kv)) for kv in np.unique(k)]
        lay = _layouts[key] = (tables, zpos, rpos, k, groups, int(k.sum()))
    return lay[1:]


def encode_body(codes: np.ndarray, tables: Tables) -> bytes:
    """uint8 codes (B, T, d) -> body bytes (module docstring)."""
    if codes.ndim != 3 or codes.shape[-1] != tables.dims:
        raise EntropyError(f"codes {codes.shape} do not have the tables' {tables.dims} channels")
    b, t, _ = codes.shape
    zpos, rpos, k, groups, _ = _layout(tables, b, t)
    zz = zigzag(codes).transpose(0, 2, 1).reshape(-1)                          # (B*d*T,) channel-major
    zpart = compressor(tables.zdict, LEVEL).compress(np.packbits(_unary(zz[zpos])).tobytes()) if len(zpos) else b""
    v = zz[rpos].astype(np.int64)
    low = [((v[pos, None] >> np.arange(kv - 1, -1, -1)) & 1).reshape(-1) for kv, pos in groups]
    low = np.packbits(np.concatenate(low).astype(np.uint8)) if low else np.zeros(0, np.uint8)
    return b"".join((varint(len(zpart)), zpart, low.tobytes(), np.packbits(_unary(v >> k)).tobytes()))


def decode_body(body: bytes, tables: Tables, batch: int, tokens: int) -> np.ndarray:
    """Body bytes -> uint8 codes (B, T, d); EntropyError on anything inconsistent."""
    zpos, rpos, k, groups, n_low = _layout(tables, batch, tokens)
    n_zpart, off = read_varint(body, 0)
    if off + n_zpart > len(body) or bool(n_zpart) != bool(len(zpos)):
        raise EntropyError("body's zstd part is truncated, or there when the tables code no channel with zstd")
    zz = np.empty(batch * tables.dims * tokens, np.int64)
    if len(zpos):
        try:
            raw = decompressor(tables.zdict).decompress(body[off:off + n_zpart], max_output_size=32 * len(zpos) + 8)
        except zstd.ZstdError as e:
            raise EntropyError(f"zstd part does not decompress ({e})") from None
        zz[zpos] = _from_unary(np.unpackbits(np.frombuffer(raw, np.uint8)), len(zpos), "zstd")
        off += n_zpart
    if len(rpos):
        low_bytes = (n_low + 7) // 8
        if off + low_bytes > len(body):
            raise EntropyError("body truncated inside its low bits")
        bits = np.unpackbits(np.frombuffer(body, np.uint8, low_bytes, off), count=n_low)
        lows, at = np.empty(len(rpos), np.int64), 0
        for kv, pos in groups:                                                 # fixed width kv per group
            lows[pos] = bits[at:at + kv * len(pos)].reshape(-1, kv) @ (1 << np.arange(kv - 1, -1, -1))
            at += kv * len(pos)
        off += low_bytes
        u = _from_unary(np.unpackbits(np.frombuffer(body, np.uint8, len(body) - off, off)), len(rpos), "Rice")
        zz[rpos] = (u << k) | lows
    elif off != len(body):
        raise EntropyError("body has trailing bytes")
    return np.ascontiguousarray(unzigzag(zz).reshape(batch, tables.dims, tokens).transpose(0, 2, 1))
