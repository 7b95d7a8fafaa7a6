"""The codec payload: a codec head's integer codes + kept-token mask as few, self-checking bytes.

A codec head (`head_k{K}_c{D}x{B}.onnx`) emits `codes` uint8 (B, P+K, d), each in [0, 2^bits),
and `indices` int64 (B, K) ascending. On the wire, little-endian:

    header (25-28 bytes)
      magic b"MC" | u8 version << 4 | flags | 4 bytes codec id | 8 bytes model id | u8 bits
      | varint B | varint K | varint N | varint d | varint P | u32 CRC-32
    mask     B x ceil(N/8) bytes: bit i (LSB first) set when patch i is kept; K set bits per
             row, ascending order implied
    body     codes in image, channel, token order, bit-packed at `bits` bits each (MSB first);
             zstd-compressed (magicless frame, no checksum, no dict id) when that is smaller,
             with the codec's zstd dictionary when it has one. For 3, 5, 6 and 7 bits zstd is
             given one code per byte instead (flag 4), which its byte-wise entropy coder
             models much better than codes straddling byte boundaries (measured in
             docs/results/codec_wire.md); an uncompressed body is always bit-packed

An entropy codec (eP, bits 8) sends instead (flag 8) the body of formats/entropy.py: its codes
coded per channel with the codec's tables (Rice codes + zstd), which travel in the export as
its dictionary file and seed the CRC like a dictionary.

flags: 1 = body is zstd, 2 = compressed with a dictionary, 4 = zstd input is one code per byte,
8 = entropy-codec body (alone). The CRC-32 covers the header (with
the CRC field zeroed), the mask and the body as sent, seeded with the CRC-32 of the dictionary
when one was used: a flipped bit anywhere, a cut, or a decoder holding a different (or damaged)
dictionary is caught before anything is decompressed. Channel-major order puts each
principal direction's codes together, which zstd models better than token order.

numpy + zstandard only (device side, the [edge] extra; zstandard has aarch64 wheels).
"""
from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard as zstd

from . import entropy

MAGIC = b"MC"
VERSION = 1
FLAG_ZSTD, FLAG_DICT, FLAG_BYTES, FLAG_ENTROPY = 1, 2, 4, 8
BYTE_LAYOUT_BITS = (3, 5, 6, 7)   # zstd models whole bytes: codes that straddle bytes compress worse
_FIXED = struct.Struct("<2sB4s8sB")                     # magic, version|flags, codec id, model id, bits
LEVEL = 19                                              # payloads are tiny: the top levels cost microseconds


class WireError(ValueError):
    """The payload cannot be decoded, or is for another model/codec (the message says which)."""


@dataclass
class Header:
    version: int
    flags: int
    codec_id: str          # 8 hex chars
    model_id: str          # 16 hex chars
    bits: int
    batch: int
    keep: int              # K
    num_patches: int       # N
    dims: int              # d
    prefix: int            # P, prefix tokens (CLS, ...) sent in front of the K kept tokens
    size: int              # header bytes


def codec_id(model_id: str, dims: int, bits: int, basis_sha256: str, dictionary_sha256: str | None) -> str:
    """8 hex chars naming one codec of one export: model, (d, b), basis and dictionary."""
    key = f"{model_id}|{dims}x{bits}|{basis_sha256}|{dictionary_sha256 or ''}"
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_codec(name: str) -> tuple[int, int]:
    """'16x4' -> (16 dims, 4 bits). WireError (a ValueError) with the rule on anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(name))
    if not m:
        raise WireError(f"codec {name!r}: expected DxB, e.g. 16x4 (D principal dims, B bits per channel), "
                        "or eP, e.g. e6 (entropy-coded, about P% relative token error)")
    d, b = int(m.group(1)), int(m.group(2))
    if d < 1 or not 1 <= b <= 8:
        raise WireError(f"codec {name!r}: dims must be >= 1 and bits 1..8")
    return d, b


def parse_entropy(name: str) -> float | None:
    """'e6' -> 0.06 (the relative token error an eP codec is fit to); None when `name` is not eP."""
    m = re.fullmatch(r"\s*[eE]\s*(\d+(?:\.\d+)?)\s*", str(name))
    if not m:
        return None
    pct = float(m.group(1))
    if not 0 < pct < 100:
        raise WireError(f"codec {name!r}: eP needs 0 < P < 100 (percent relative token error)")
    return pct / 100


def codec_name(name: str) -> str:
    """The canonical name of a codec spec ('16X4' -> '16x4', 'e6.0' -> 'e6'): the manifest's."""
    rel = parse_entropy(name)
    if rel is not None:
        return f"e{rel * 100:g}"
    return "{}x{}".format(*parse_codec(name))


def find_codec(variant_entry: dict, name: str) -> dict:
    """The manifest's codec entry `name` (e.g. '16x4', 'e6') of one variant; clear error if absent."""
    codecs = variant_entry.get("codecs") or []
    want = codec_name(name)
    for c in codecs:
        if c["name"] == want:
            return c
    have = [c["name"] for c in codecs] or "none (export with --codec DxB)"
    raise WireError(f"no codec {name} for keep ratio {variant_entry.get('keep_ratio')}; this export has {have}")


def load_dictionary(export_dir, entry: dict) -> bytes | None:
    """The codec's zstd dictionary from the export folder, checked against the manifest's sha256."""
    from pathlib import Path

    ref = entry.get("dictionary")
    if not ref:
        return None
    path = Path(export_dir) / ref["file"]
    if not path.exists():
        raise WireError(f"codec {entry['name']}: dictionary {path} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise WireError(f"codec {entry['name']}: {path} does not match the manifest's sha256 (modified?)")
    return data


# ---- bits, varints, mask -------------------------------------------------------------------

def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """uint8 codes (any shape, values < 2^bits) -> their low `bits` bits, MSB first, C order."""
    v = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return v.tobytes()
    planes = np.unpackbits(v[:, None], axis=1)[:, 8 - bits:]            # (n, bits)
    return np.packbits(planes.reshape(-1)).tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of pack_bits: `count` uint8 codes."""
    if bits == 8:
        return np.frombuffer(data, np.uint8, count).copy()
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits).reshape(count, bits)
    return np.packbits(planes, axis=1).reshape(count) >> np.uint8(8 - bits)


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def indices_to_mask(indices: np.ndarray, num_patches: int) -> bytes:
    """(B, K) indices -> B rows of ceil(N/8) bytes, bit i (LSB first) = patch i kept."""
    b, k = indices.shape
    if k and (indices.min() < 0 or indices.max() >= num_patches):
        raise WireError(f"indices out of range: {indices.min()}..{indices.max()}, valid 0..{num_patches - 1}")
    mask = np.zeros((b, num_patches), np.uint8)
    np.put_along_axis(mask, indices.astype(np.int64), 1, axis=1)
    if (mask.sum(1) != k).any():
        raise WireError("indices repeat a patch in some row (each kept patch is sent once)")
    return np.packbits(mask, axis=1, bitorder="little").tobytes()


def mask_to_indices(data: bytes, batch: int, num_patches: int, keep: int) -> np.ndarray:
    """Inverse of indices_to_mask: int64 (B, K) ascending; the popcount must be K in every row."""
    rows = np.frombuffer(data, np.uint8).reshape(batch, -1)
    mask = np.unpackbits(rows, axis=1, count=num_patches, bitorder="little")
    counts = mask.sum(1)
    if (counts != keep).any() or np.unpackbits(rows, axis=1, bitorder="little")[:, num_patches:].any():
        bad = int(np.flatnonzero(counts != keep)[0]) if (counts != keep).any() else 0
        raise WireError(f"mask corrupt: row {bad} keeps {int(counts[bad])} patches, header says K={keep}")
    return np.nonzero(mask)[1].reshape(batch, keep).astype(np.int64)


# ---- zstd ------------------------------------------------------------------------------------

def _layout(codes: np.ndarray, bits: int) -> bytes:
    """What zstd compresses: (.., d, T) codes one per byte (3, 5, 6, 7 bits) or bit-packed."""
    return np.ascontiguousarray(codes).tobytes() if bits in BYTE_LAYOUT_BITS else pack_bits(codes, bits)


def body_samples(codes: np.ndarray, bits: int) -> list[bytes]:
    """One zstd input per image, as the encoder lays it out: the samples a dictionary learns from."""
    codes = np.asarray(codes, np.uint8)
    return [_layout(c.T, bits) for c in codes]                          # (d, T) per image


def train_dictionary(codes: np.ndarray, bits: int, entropy_codec: bool = False, size: int = 4096) -> bytes:
    """A zstd dictionary for this codec, trained on the packed codes of calibration images, or
    for an entropy codec its tables (formats/entropy.py).

    codes: uint8 (M, P+K, d) from the codec head on M calibration images (not test images).
    Returns the dictionary bytes (store them in the export; the manifest records their sha256).
    """
    if entropy_codec:
        return entropy.train_tables(np.asarray(codes, np.uint8))
    samples = body_samples(codes, bits)
    if len(samples) < 16:
        raise WireError(f"train_dictionary needs at least 16 calibration images, got {len(samples)}")
    size = min(size, max(256, sum(map(len, samples)) // 4))
    try:
        return zstd.train_dictionary(size, samples, level=LEVEL).as_bytes()
    except zstd.ZstdError as e:
        raise WireError(f"zstd could not train a dictionary on {len(samples)} payloads of "
                        f"{len(samples[0])} bytes: {e}") from None


# ---- payload ---------------------------------------------------------------------------------

def _header(flags: int, cid: bytes, mid: bytes, bits: int, b: int, k: int, n: int, d: int, p: int) -> bytes:
    return (_FIXED.pack(MAGIC, VERSION << 4 | flags, cid, mid, bits)
            + b"".join(entropy.varint(v) for v in (b, k, n, d, p)))


def _hex_bytes(value: str, n: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != n:
        raise WireError(f"{what} {value!r} is not {2 * n} hex characters")
    return raw


def encode(codes: np.ndarray, indices: np.ndarray, num_patches: int, bits: int, model_id: str,
           codec_id: str, dictionary: bytes | None = None) -> bytes:
    """Codec head output -> one payload. codes uint8 (B, P+K, d), indices int64 (B, K) ascending."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 3 or indices.ndim != 2 or codes.shape[0] != indices.shape[0] \
            or codes.shape[1] < indices.shape[1]:
        raise WireError(f"codes {codes.dtype} {codes.shape} and indices {indices.shape} are not "
                        "uint8 (B, P+K, d) and (B, K)")
    if not 1 <= bits <= 8:
        raise WireError(f"bits {bits}: a codec sends 1..8 bits per channel")
    if bits < 8 and codes.size and int(codes.max()) >> bits:
        raise WireError(f"codes reach {int(codes.max())}, more than {bits} bits hold")
    if indices.shape[1] > 1 and not (np.diff(indices, axis=1) > 0).all():
        raise WireError("indices must be strictly ascending in each row (the mask implies that order)")
    b, t, d = codes.shape
    k = indices.shape[1]
    cid, mid = _hex_bytes(codec_id, 4, "codec id"), _hex_bytes(model_id, 8, "model id")
    mask = indices_to_mask(indices, num_patches)
    if dictionary and dictionary[:4] == entropy.MAGIC:                  # an entropy codec's tables
        try:
            body, flags = entropy.encode_body(codes, entropy.read_tables(dictionary)), FLAG_ENTROPY
        except entropy.EntropyError as e:
            raise WireError(str(e)) from None
    else:
        cm = codes.transpose(0, 2, 1)                                   # (B, d, T): channel-major
        raw = pack_bits(cm, bits)
        z = entropy.compressor(dictionary, LEVEL).compress(_layout(cm, bits))
        flags = 0
        if len(z) < len(raw):
            flags = FLAG_ZSTD | (FLAG_DICT if dictionary else 0) | (FLAG_BYTES if bits in BYTE_LAYOUT_BITS else 0)
        body = z if flags else raw
    head = _header(flags, cid, mid, bits, b, k, num_patches, d, t - k)
    crc = _crc(head + b"\0\0\0\0", mask, body, dictionary if flags & (FLAG_DICT | FLAG_ENTROPY) else None)
    return b"".join((head, struct.pack("<I", crc), mask, body))


_dict_crc: dict = {}


def _crc(head: bytes, mask: bytes, body: bytes, dictionary: bytes | None) -> int:
    """CRC-32 of header, mask and body as sent, seeded with the dictionary's own CRC-32."""
    seed = 0
    if dictionary:
        seed = _dict_crc.get(dictionary)
        if seed is None:
            seed = _dict_crc[dictionary] = zlib.crc32(dictionary)
    return zlib.crc32(body, zlib.crc32(mask, zlib.crc32(head, seed)))


def read_header(data: bytes) -> Header:
    """Parse and sanity-check the header (no CRC yet: that needs the body)."""
    if len(data) < _FIXED.size + 9:
        raise WireError(f"payload truncated: {len(data)} bytes, a codec header alone is at least {_FIXED.size + 9}")
    magic, vf, cid, mid, bits = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not a Mercury codec payload (expected {MAGIC!r})")
    if vf >> 4 != VERSION:
        raise WireError(f"codec payload version {vf >> 4}, this reader understands {VERSION}")
    flags = vf & 0xF
    if (flags & (FLAG_DICT | FLAG_BYTES) and not flags & FLAG_ZSTD) or (flags & FLAG_ENTROPY and flags != FLAG_ENTROPY):
        raise WireError(f"unknown flags {flags:#x} in header (corrupt payload?)")
    if not 1 <= bits <= 8:
        raise WireError(f"header says {bits} bits per code (corrupt payload?)")
    off, sizes = _FIXED.size, []
    for _ in range(5):
        v, off = entropy.read_varint(data, off, WireError, "header size field")
        sizes.append(v)
    b, k, n, d, p = sizes
    if b == 0 or d == 0 or k == 0 or k > n or n > 1 << 20 or d > 1 << 16 or p > 64 or b > 1 << 16:
        raise WireError(f"bad sizes in header: B={b}, K={k}, N={n}, d={d}, P={p} (corrupt payload?)")
    return Header(VERSION, flags, cid.hex(), mid.hex(), bits, b, k, n, d, p, off + 4)


def decode(data: bytes, *, model_id: str | None = None, codec_id: str | None = None,
           dictionary: bytes | None = None) -> tuple[Header, np.ndarray, np.ndarray]:
    """Payload -> header, codes uint8 (B, P+K, d), indices int64 (B, K), everything checked.

    model_id / codec_id: what the receiver serves; a payload for another export or codec is
    refused. dictionary: the codec's zstd dictionary (None when the codec has none).
    """
    data = bytes(data)
    h = read_header(data)
    if model_id is not None and h.model_id != model_id:
        raise WireError(f"payload is for model {h.model_id}, this export is {model_id}: "
                        "head and tail come from different exports")
    if codec_id is not None and h.codec_id != codec_id:
        raise WireError(f"payload uses codec {h.codec_id}, this tail expects {codec_id}: "
                        "device and server hold different codecs (re-fetch the export)")
    if h.flags & FLAG_DICT and not dictionary:
        raise WireError(f"payload was compressed with codec {h.codec_id}'s zstd dictionary; none was given")
    if h.flags & FLAG_ENTROPY and not (dictionary and dictionary[:4] == entropy.MAGIC):
        raise WireError(f"payload was coded with entropy codec {h.codec_id}'s tables; none were given")
    if h.flags & FLAG_ZSTD and not h.flags & FLAG_DICT and dictionary:
        raise WireError("payload was compressed without a dictionary but the codec has one (codec mismatch)")
    t = h.prefix + h.keep
    count = h.batch * t * h.dims
    n_raw, n_mask = packed_size(count, h.bits), h.batch * ((h.num_patches + 7) // 8)
    body_at = h.size + n_mask
    if len(data) < body_at or (not h.flags and len(data) != body_at + n_raw):
        what = "truncated" if len(data) < body_at + (0 if h.flags else n_raw) else "has trailing bytes"
        raise WireError(f"payload {what}: {len(data)} bytes for B={h.batch}, K={h.keep}, N={h.num_patches}, "
                        f"d={h.dims}, {h.bits} bits")
    mask, body = data[h.size:body_at], data[body_at:]
    (crc,) = struct.unpack_from("<I", data, h.size - 4)
    seeded = h.flags & (FLAG_DICT | FLAG_ENTROPY)
    if _crc(data[:h.size - 4] + b"\0\0\0\0", mask, body, dictionary if seeded else None) != crc:
        hint = f", or decoded with a different dictionary than codec {h.codec_id}'s" if seeded else ""
        raise WireError(f"payload checksum mismatch: truncated or corrupted in transit{hint}")
    indices = mask_to_indices(mask, h.batch, h.num_patches, h.keep)
    if h.flags & FLAG_ENTROPY:
        tables = entropy.read_tables(dictionary)
        if tables.dims != h.dims or h.bits != 8:
            raise WireError(f"payload holds d={h.dims}, {h.bits} bits; the entropy tables are for d={tables.dims}, 8 bits")
        try:
            return h, entropy.decode_body(body, tables, h.batch, t), indices
        except entropy.EntropyError as e:
            raise WireError(str(e)) from None
    if h.flags & FLAG_ZSTD:
        n_in = count if h.flags & FLAG_BYTES else n_raw
        try:
            raw = entropy.decompressor(dictionary if h.flags & FLAG_DICT else None).decompress(body, max_output_size=n_in)
        except zstd.ZstdError as e:
            raise WireError(f"payload body does not decompress ({e})") from None
        if len(raw) != n_in:
            raise WireError(f"payload body decompresses to {len(raw)} bytes, expected {n_in}")
        flat = np.frombuffer(raw, np.uint8) if h.flags & FLAG_BYTES else unpack_bits(raw, count, h.bits)
    else:
        flat = unpack_bits(body, count, h.bits)
    if h.bits < 8 and int(flat.max()) >> h.bits:
        raise WireError(f"payload holds codes above {h.bits} bits (corrupt body)")
    codes = flat.reshape(h.batch, h.dims, t).transpose(0, 2, 1)
    return h, np.ascontiguousarray(codes), indices


def entropy_bytes(codes: np.ndarray, bits: int) -> float:
    """Mean bytes per image of the codes under their empirical per-channel order-0 model.

    codes (M, T, d): the distribution of each channel is counted over all M*T codes, and each
    image costs T * sum_c H_c bits. Neither mask nor header is included; a static coder that
    knew these distributions could reach this, so bytes-on-wire minus it is the coder's gap.
    """
    codes = np.asarray(codes, np.uint8)
    m, t, d = codes.shape
    total = 0.0
    for c in range(d):
        p = np.bincount(codes[:, :, c].reshape(-1), minlength=1 << bits) / (m * t)
        p = p[p > 0]
        total += float(-(p * np.log2(p)).sum())
    return total * t / 8
