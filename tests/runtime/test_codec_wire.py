"""formats/codec_wire.py: the codec payload round trip and its refusals, on codes from real images.

The codes here come from real CIFAR-10 JPEGs without torch: 4x4x3 pixel patches (the reference
model's patch size), projected onto 16 principal directions fitted on train images, quantised
to 4 bits with calibrated ranges; kept patches by patch variance (a stand-in for the head's
scores). Same shapes and statistics class as a codec head's output, no export needed.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mercury_onnx.formats import codec_wire as w

from ..conftest import CIFAR_TEST, CIFAR_TRAIN

MODEL, CODEC = "0123456789abcdef", "c0dec0de"
N, D, BITS, K = 64, 16, 4, 16


def _patches(folder, count):
    files = sorted(folder.rglob("*.jpg"))[:: max(1, len(list(folder.rglob("*.jpg"))) // count)][:count]
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files])   # (M, 32, 32, 3)
    m = len(x)
    return x.reshape(m, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(m, N, 48)             # (M, N, 48)


def pca_patches():
    """Train (400) and test (64) images' patches, their mean and principal directions (rows of vt)."""
    if not CIFAR_TEST.exists() or not CIFAR_TRAIN.exists():
        pytest.skip("CIFAR-10 not found in ../shared")
    train, test = _patches(CIFAR_TRAIN, 400), _patches(CIFAR_TEST, 64)
    mean = train.reshape(-1, 48).mean(0)
    _, _, vt = np.linalg.svd(train.reshape(-1, 48) - mean, full_matrices=False)
    return train, test, mean, vt


@pytest.fixture(scope="module")
def real_codes():
    train, test, mean, vt = pca_patches()
    basis = vt[:D].T                                                                            # (48, d)
    proj = train.reshape(-1, 48) @ basis - mean @ basis
    lo, hi = np.percentile(proj, 0.5, 0), np.percentile(proj, 99.5, 0)

    def codes_of(p):
        y = (p - mean) @ basis                                                                  # (M, N, d)
        idx = np.sort(np.argsort(-p.var(-1), 1)[:, :K], 1)                                      # (M, K)
        kept = np.take_along_axis(y, idx[..., None], 1)
        cls = y.mean(1, keepdims=True)                                                          # a prefix token
        q = np.rint((np.concatenate([cls, kept], 1) - lo) / (hi - lo) * (2 ** BITS - 1))
        return np.clip(q, 0, 2 ** BITS - 1).astype(np.uint8), idx.astype(np.int64)

    return codes_of(train), codes_of(test)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_round_trip_bit_exact(real_codes, bits):
    (_, _), (codes, idx) = real_codes
    codes = codes >> (4 - bits) if bits < 4 else (codes.astype(np.uint16) << (bits - 4)).astype(np.uint8)
    for batch in (codes[:1], codes[:7]):
        data = w.encode(batch, idx[:len(batch)], N, bits, MODEL, CODEC)
        h, c, i = w.decode(data, model_id=MODEL, codec_id=CODEC)
        assert c.dtype == np.uint8 and np.array_equal(c, batch)
        assert i.dtype == np.int64 and np.array_equal(i, idx[:len(batch)])
        assert (h.bits, h.batch, h.keep, h.num_patches, h.dims, h.prefix) == (bits, len(batch), K, N, D, 1)


def test_dictionary_round_trip_and_smaller(real_codes):
    (train, _), (codes, idx) = real_codes
    dic = w.train_dictionary(train, BITS)
    plain = [len(w.encode(codes[j:j + 1], idx[j:j + 1], N, BITS, MODEL, CODEC)) for j in range(32)]
    with_d = []
    for j in range(32):
        data = w.encode(codes[j:j + 1], idx[j:j + 1], N, BITS, MODEL, CODEC, dic)
        _, c, i = w.decode(data, model_id=MODEL, codec_id=CODEC, dictionary=dic)
        assert np.array_equal(c, codes[j:j + 1]) and np.array_equal(i, idx[j:j + 1])
        with_d.append(len(data))
    raw = 25 + N // 8 + w.packed_size((1 + K) * D, BITS)
    assert np.mean(with_d) < np.mean(plain) <= raw        # the dictionary pays on payloads this small
    assert np.mean(with_d) >= 25 + N // 8                 # header + mask always go


def test_wrong_model_or_codec_refused(real_codes):
    (_, _), (codes, idx) = real_codes
    data = w.encode(codes[:1], idx[:1], N, BITS, MODEL, CODEC)
    with pytest.raises(w.WireError, match="different exports"):
        w.decode(data, model_id="fedcba9876543210")
    with pytest.raises(w.WireError, match="different codecs"):
        w.decode(data, codec_id="00000000")


def test_dictionary_missing_or_different_refused(real_codes):
    (train, _), (codes, idx) = real_codes
    dic = w.train_dictionary(train, BITS)
    other = w.train_dictionary(train[::-1][:200], BITS, size=2048)
    data = w.encode(codes[:1], idx[:1], N, BITS, MODEL, CODEC, dic)
    with pytest.raises(w.WireError, match="dictionary"):
        w.decode(data)
    with pytest.raises(w.WireError, match="dictionary"):
        w.decode(data, dictionary=other)
    tampered = bytearray(dic)
    tampered[len(dic) // 2] ^= 0xFF                       # a dictionary damaged on disk
    with pytest.raises(w.WireError, match="dictionary"):
        w.decode(data, dictionary=bytes(tampered))
    plain = w.encode(codes[:1], idx[:1], N, BITS, MODEL, CODEC)
    if plain[2] & w.FLAG_ZSTD:
        with pytest.raises(w.WireError, match="without a dictionary"):
            w.decode(plain, dictionary=dic)


def test_every_single_byte_tamper_is_refused(real_codes):
    """Flip each byte of a payload in turn (header, CRC, mask, body): every one raises WireError."""
    (_, _), (codes, idx) = real_codes
    for data in (w.encode(codes[:2], idx[:2], N, BITS, MODEL, CODEC),
                 w.encode(codes[:1], idx[:1], N, 8, MODEL, CODEC)):       # 8 bits: may go raw
        for pos in range(len(data)):
            bad = bytearray(data)
            bad[pos] ^= 0x5A
            with pytest.raises(w.WireError):
                w.decode(bytes(bad), model_id=MODEL, codec_id=CODEC)


def test_mask_tamper_message(real_codes):
    (_, _), (codes, idx) = real_codes
    data = bytearray(w.encode(codes[:1], idx[:1], N, BITS, MODEL, CODEC))
    h = w.read_header(bytes(data))
    data[h.size] ^= 0x01                                  # one patch more or less in the mask
    with pytest.raises(w.WireError, match="checksum|mask"):
        w.decode(bytes(data))


def test_truncated_and_trailing_refused(real_codes):
    (_, _), (codes, idx) = real_codes
    data = w.encode(codes[:3], idx[:3], N, BITS, MODEL, CODEC)
    for cut in (0, 1, 5, 20, 26, len(data) // 2, len(data) - 1):
        with pytest.raises(w.WireError, match="truncated|corrupt|checksum"):
            w.decode(data[:cut])
    with pytest.raises(w.WireError):
        w.decode(data + b"\0")


def test_encode_refuses_bad_input(real_codes):
    (_, _), (codes, idx) = real_codes
    with pytest.raises(w.WireError, match="more than 3 bits"):
        w.encode(codes[:1], idx[:1], N, 3, MODEL, CODEC)
    with pytest.raises(w.WireError, match="ascending"):
        w.encode(codes[:1], idx[:1, ::-1], N, BITS, MODEL, CODEC)
    with pytest.raises(w.WireError, match="uint8"):
        w.encode(codes[:1].astype(np.int16), idx[:1], N, BITS, MODEL, CODEC)
    with pytest.raises(w.WireError, match="hex"):
        w.encode(codes[:1], idx[:1], N, BITS, "model", CODEC)
    with pytest.raises(w.WireError, match="DxB"):
        w.parse_codec("16-4")
    assert w.parse_codec("16x4") == (16, 4)


def test_entropy_bound():
    """Per-channel order-0 entropy: uniform codes cost `bits` each, constant channels nothing."""
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 16, (4000, 5, 2), dtype=np.uint8)
    assert abs(w.entropy_bytes(uniform, 4) - 5 * 2 * 4 / 8) < 0.01
    half = uniform.copy()
    half[:, :, 1] = 3                                     # one channel constant: half the bits
    assert abs(w.entropy_bytes(half, 4) - 5 * 4 / 8) < 0.01
