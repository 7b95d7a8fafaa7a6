"""Codec heads/tails (export --codec DxB) on real CIFAR-10 images: ORT codes vs PyTorch's."""
import hashlib

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.export import export_model
from mercury_onnx.export.codecs import head_outputs
from mercury_onnx.export.images import load_images
from mercury_onnx.formats.manifest import load_manifest
from mercury_onnx.models.checkpoint import load_mercury, mercury_from_any, save_mercury
from mercury_onnx.formats import codec_wire
from mercury_onnx.formats.codec_wire import codec_name, parse_codec
from mercury_onnx.models.codec import fit_codec, fit_entropy_codec


def _onnx_and_torch(export, c, m, codec, cifar_test, man):
    """32 test images through the export's codec head (ORT) and the torch head + codec + tail."""
    p = man["preprocess"]
    x, _ = load_images(cifar_test, 32, tuple(p["size"]), p["mean"], p["std"], man["classes"], offset=1000)
    codes, idx = _sess(export / c["head"]["file"]).run(None, {"images": x})
    with torch.no_grad():
        tok_t, idx_t = m.forward_head(torch.from_numpy(x))
        codes_t = codec.encode(tok_t, idx_t)
        logits_t = m.forward_tail(codec.decode(codes_t, idx_t), idx_t).numpy()
    return codes, idx, codes_t, idx_t, logits_t


def _sess(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def codec_export(ref_json, cifar_test, tmp_path_factory):
    out = tmp_path_factory.mktemp("codec") / "export"
    export_model(ref_json, out, [0.25], codecs=["16x4", "e4"], codec_images=256,
                 validate_data=cifar_test, validate_images=16, log=None)
    return out


def test_onnx_codec_head_codes_within_one_step_of_torch(codec_export, ref_json, cifar_test):
    man = load_manifest(codec_export)
    v = man["variants"][0]
    c = v["codecs"][0]
    assert (c["name"], c["dims"], c["bits"], c["kind"]) == ("16x4", 16, 4, "fixed") and len(c["codec_id"]) == 8
    assert hashlib.sha256((codec_export / c["dictionary"]["file"]).read_bytes()).hexdigest() == c["dictionary"]["sha256"]
    assert man["validation"]["passed"] and man["validation"]["max_abs_diff"]["head_k16_c16x4.onnx.codes_steps"] <= 1
    # the same codec as the export's: fit again on the same 256 calibration images
    (m,) = mercury_from_any(str(ref_json), keep_ratios=[0.25])
    p = man["preprocess"]
    cal, _ = load_images(cifar_test.parent / "train", 256, tuple(p["size"]), p["mean"], p["std"])
    with torch.no_grad():
        codec = fit_codec(*m.forward_head(torch.from_numpy(cal)), m.num_patches, 16, 4)
    codes, idx, codes_t, idx_t, logits_t = _onnx_and_torch(codec_export, c, m, codec, cifar_test, man)
    assert codes.dtype == np.uint8 and codes.shape == (32, 17, 16) and codes.max() <= 15
    assert np.array_equal(idx, idx_t.numpy())
    steps = np.abs(codes.astype(int) - codes_t.numpy().astype(int))
    assert steps.max() <= 1 and (steps == 0).mean() > 0.99
    (logits,) = _sess(codec_export / c["tail"]["file"]).run(None, {"codes": codes_t.numpy(), "indices": idx})
    np.testing.assert_allclose(logits, logits_t, atol=1e-4 * max(1, np.abs(logits_t).max()))


def test_onnx_entropy_codec_head_and_tail(codec_export, ref_json, cifar_test):
    """e4: the export's validation held its codes within one step of PyTorch's and its tail's
    logits to torch's; a refit on the same images reaches the 4% it aims at (with the same
    channels give or take a few borderline ones: the choice is discrete, the tokens differ in
    float rounding between batchings); the ONNX codec path agrees with the uncompressed
    head + tail on real test images; the wire round trip with the export's tables is exact."""
    man = load_manifest(codec_export)
    v = man["variants"][0]
    c = v["codecs"][1]
    assert (c["name"], c["bits"], c["kind"]) == ("e4", 8, "entropy") and c["dictionary"]["file"].endswith(".tables")
    diff = man["validation"]["max_abs_diff"]
    assert man["validation"]["passed"] and diff["head_k16_ce4.onnx.codes_steps"] <= 1 and "tail_k16_ce4.onnx.logits" in diff
    (m,) = mercury_from_any(str(ref_json), keep_ratios=[0.25])
    p = man["preprocess"]
    cal, _ = load_images(cifar_test.parent / "train", 256, tuple(p["size"]), p["mean"], p["std"])
    tok_c, idx_c = head_outputs(m, cal)
    with torch.no_grad():
        codec = fit_entropy_codec(tok_c, idx_c, m.num_patches, 0.04)
        fit_err = float(((codec.roundtrip(tok_c, idx_c) - tok_c).flatten(1).norm(dim=1)
                         / tok_c.flatten(1).norm(dim=1)).mean())
    assert abs(codec.dims - c["dims"]) <= 8 and abs(fit_err - 0.04) < 0.004
    x, _ = load_images(cifar_test, 64, tuple(p["size"]), p["mean"], p["std"], man["classes"], offset=1000)
    codes, idx = _sess(codec_export / c["head"]["file"]).run(None, {"images": x})
    (logits,) = _sess(codec_export / c["tail"]["file"]).run(None, {"codes": codes, "indices": idx})
    tokens, idx_plain = _sess(codec_export / v["head"]["file"]).run(None, {"images": x})
    (plain,) = _sess(codec_export / v["tail"]["file"]).run(None, {"tokens": tokens, "indices": idx_plain})
    assert np.array_equal(idx, idx_plain) and (logits.argmax(1) == plain.argmax(1)).mean() >= 0.9
    tables = (codec_export / c["dictionary"]["file"]).read_bytes()
    data = codec_wire.encode(codes, idx, m.num_patches, 8, man["model_id"], c["codec_id"], tables)
    _, back, back_idx = codec_wire.decode(data, model_id=man["model_id"], codec_id=c["codec_id"], dictionary=tables)
    assert np.array_equal(back, codes) and np.array_equal(back_idx, idx)
    assert len(data) < codes.size / 2                                              # < 4 bits per 8-bit code


def test_codec_error_falls_with_dims_and_bits(ref_json, cifar_test):
    (m,) = mercury_from_any(str(ref_json), keep_ratios=[0.5])
    x, _ = load_images(cifar_test.parent / "train", 96, (32, 32), m.cfg.mean, m.cfg.std)
    with torch.no_grad():
        tok, idx = m.forward_head(torch.from_numpy(x))
    fit, test = slice(0, 64), slice(64, 96)
    err = {}
    for d, b in [(8, 4), (16, 4), (16, 8)]:
        c = fit_codec(tok[fit], idx[fit], m.num_patches, d, b)
        err[(d, b)] = float(((c.roundtrip(tok[test], idx[test]) - tok[test]) ** 2).mean())
        assert 0 < c.variance_kept <= 1
    assert err[(16, 8)] < err[(16, 4)] < err[(8, 4)]


def test_codec_saved_with_the_checkpoint(ref_json, cifar_test, tmp_path):
    (m,) = mercury_from_any(str(ref_json), keep_ratios=[0.25])
    x, _ = load_images(cifar_test.parent / "train", 32, (32, 32), m.cfg.mean, m.cfg.std)
    with torch.no_grad():
        m.codec = fit_codec(*m.forward_head(torch.from_numpy(x)), m.num_patches, 8, 3)
    save_mercury(tmp_path / "ck", [m])
    (back,) = load_mercury(tmp_path / "ck")
    assert back.codec.name == "8x3"
    for k, v in m.codec.state_dict().items():
        assert torch.equal(v, back.codec.state_dict()[k])


def test_bad_codec_name_is_a_clear_error(ref_json, tmp_path):
    for bad in ("16", "16x9", "0x4", "ax4"):
        with pytest.raises(ValueError, match="codec"):
            parse_codec(bad)
    for bad in ("e0", "e100", "ex", "e-1"):
        with pytest.raises(ValueError, match="codec"):
            codec_name(bad)
    assert (codec_name(" 16X4 "), codec_name("E6.0"), codec_name("e6.5")) == ("16x4", "e6", "e6.5")
    r = CliRunner().invoke(app, ["export", str(ref_json), str(tmp_path / "o"), "--codec", "16x9"])
    assert r.exit_code == 2 and "bits 1..8" in r.output and not (tmp_path / "o").exists()
