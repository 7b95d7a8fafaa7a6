"""formats/entropy.py (the eP codecs' body) through formats/codec_wire.py, on codes of real images.

Codes without torch, from real CIFAR-10 JPEGs: 4x4x3 pixel patches (the reference model's
patch size), centred, on all 48 principal directions fitted on train images, one quantiser
step for every channel (what an eP codec does), codes q + 128: channels from ~0.2 bit to
~6 bits of entropy, the spread the per-channel coder is for.
"""
from __future__ import annotations

import numpy as np
import pytest

from mercury_onnx.formats import codec_wire as w
from mercury_onnx.formats import entropy as E

from .test_codec_wire import pca_patches

MODEL, CODEC = "0123456789abcdef", "e0c0dec0"
N, K = 64, 16


@pytest.fixture(scope="module")
def codes():
    train, test, mean, vt = pca_patches()

    def codes_of(p):
        y = (p - mean) @ vt.T                                                       # (M, N, 48)
        idx = np.sort(np.argsort(-p.var(-1), 1)[:, :K], 1)
        kept = np.concatenate([y.mean(1, keepdims=True), np.take_along_axis(y, idx[..., None], 1)], 1)
        return np.clip(np.rint(kept / 0.02) + 128, 0, 255).astype(np.uint8), idx.astype(np.int64)

    (ctr, _), (cte, ite) = codes_of(train), codes_of(test)
    return ctr, E.train_tables(ctr), cte, ite


def test_round_trip_bit_exact(codes):
    _, tables, c, idx = codes
    assert (E.read_tables(tables).rice == E.ZSTD_CHANNEL).any() and (E.read_tables(tables).rice != E.ZSTD_CHANNEL).any()
    for b in (1, 5):
        data = w.encode(c[:b], idx[:b], N, 8, MODEL, CODEC, tables)
        h, back, back_idx = w.decode(data, model_id=MODEL, codec_id=CODEC, dictionary=tables)
        assert h.flags == w.FLAG_ENTROPY and (h.batch, h.dims, h.prefix) == (b, 48, 1)
        assert back.dtype == np.uint8 and np.array_equal(back, c[:b]) and np.array_equal(back_idx, idx[:b])
    extreme = c[:2].copy()
    extreme[0, 0, :3], extreme[1, 3, -3:] = (0, 255, 128), (255, 0, 1)              # the code range's ends
    _, back, _ = w.decode(w.encode(extreme, idx[:2], N, 8, MODEL, CODEC, tables), dictionary=tables)
    assert np.array_equal(back, extreme)


def test_bytes_near_the_per_channel_entropy(codes):
    """The coder's body is within 5% + 12 B of the test codes' cross-entropy under per-channel
    distributions counted on the train codes (what an ideal static coder with the same tables
    would need; 12 B: the length varint, zstd's frame and block headers, two padded bytes), and
    well below one zstd stream over all channels (the 8-bit DxB path)."""
    train, tables, c, idx = codes
    bits = 0.0
    for ch in range(c.shape[-1]):
        p = np.bincount(train[..., ch].ravel(), minlength=256) + 1.0
        bits -= np.log2((p / p.sum())[c[..., ch]]).sum()
    ideal = bits / 8 / len(c)
    body = np.mean([len(E.encode_body(c[i:i + 1], E.read_tables(tables))) for i in range(len(c))])
    plain = np.mean([len(w.encode(c[i:i + 1], idx[i:i + 1], N, 8, MODEL, CODEC)) for i in range(len(c))])
    assert ideal < body < 1.05 * ideal + 12, (body, ideal)
    assert body < 0.9 * plain, (body, plain)


def test_refusals(codes):
    _, tables, c, idx = codes
    data = w.encode(c[:2], idx[:2], N, 8, MODEL, CODEC, tables)
    with pytest.raises(w.WireError, match="tables; none were given"):
        w.decode(data)
    other = E.train_tables(c[::-1].copy())                                          # tables of other images
    with pytest.raises(w.WireError, match="checksum mismatch.*different dictionary"):
        w.decode(data, dictionary=other)
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    with pytest.raises(w.WireError, match="checksum mismatch"):
        w.decode(bytes(flipped), dictionary=tables)
    with pytest.raises(w.WireError, match="truncated|checksum"):
        w.decode(data[:-3], dictionary=tables)
    with pytest.raises(w.WireError, match="not an entropy codec|channels"):
        w.encode(c[:1, :, :40], idx[:1], N, 8, MODEL, CODEC, tables)


def test_corrupt_bodies_raise_entropy_errors_only(codes):
    """Past the CRC (a body built to pass it, or a CRC collision), every corruption is a clear
    EntropyError, never an index error or a wrong-sized array."""
    _, blob, c, _ = codes
    tables = E.read_tables(blob)
    body = E.encode_body(c[:3], tables)
    rng = np.random.default_rng(0)
    for trial in range(300):
        bad = bytearray(body)
        if trial % 3 == 0:
            bad = bad[:rng.integers(0, len(bad))]
        else:
            for _ in range(1 + trial % 4):
                bad[rng.integers(0, len(bad))] ^= 1 << int(rng.integers(0, 8))
        try:
            out = E.decode_body(bytes(bad), tables, 3, c.shape[1])
        except E.EntropyError:
            continue
        assert out.shape == c[:3].shape and out.dtype == np.uint8                   # decoded to something valid
