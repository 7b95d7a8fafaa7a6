"""Rate-accuracy pieces on real CIFAR-10 images: image re-encoding and codec payload bytes."""
import numpy as np
import torch

from mercury_onnx.calib.ratecurve import codec_dictionary, codec_payloads, recode
from mercury_onnx.export.images import load_images
from mercury_onnx.formats import codec_wire
from mercury_onnx.models.checkpoint import mercury_from_any
from mercury_onnx.models.codec import fit_codec


def test_recode_sizes_fall_with_quality(cifar_test):
    from PIL import Image

    files = sorted(cifar_test.glob("*/*.jpg"))[:8]
    imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    small, s5 = recode(imgs, "jpeg", 5)
    big, s95 = recode(imgs, "jpeg", 95)
    assert small.shape == imgs.shape and small.dtype == np.uint8
    assert np.mean(s5) < np.mean(s95)
    assert np.abs(big.astype(int) - imgs).mean() < np.abs(small.astype(int) - imgs).mean()
    _, w = recode(imgs, "webp", 50)
    assert all(n > 0 for n in w)


def test_codec_payload_is_what_the_wire_decodes(ref_json, cifar_test):
    (m,) = mercury_from_any(str(ref_json), keep_ratios=[0.25])
    x, _ = load_images(cifar_test.parent / "train", 96, (32, 32), m.cfg.mean, m.cfg.std)
    with torch.no_grad():
        tok, idx = m.forward_head(torch.from_numpy(x))
    c = fit_codec(tok[:64], idx[:64], m.num_patches, 16, 4)
    dic, cid = codec_dictionary(c, c.encode(tok[:64], idx[:64]).numpy())
    codes, ind = c.encode(tok[64:], idx[64:]).numpy(), idx[64:].numpy()
    p = codec_payloads(codes, ind, m.num_patches, c, dic, cid)
    raw = 17 * 16 * 4 // 8
    assert p["raw_packed_bytes"] == raw
    assert 8 < p["payload_bytes"] <= raw + 40 and p["payload_bytes"] <= p["payload_bytes_no_dictionary"] + 1
    one = codec_wire.encode(codes[:1], ind[:1], m.num_patches, 4, "0" * 16, cid, dic)
    _, back, back_idx = codec_wire.decode(one, codec_id=cid, dictionary=dic)
    assert np.array_equal(back, codes[:1]) and np.array_equal(back_idx, ind[:1])
