"""Codec heads end to end: `Client(codec=...)` -> serve-tail's codec model -> logits equal to the
local codec head + tail; a payload or codec id of another codec is refused with 409."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.formats.manifest import load_manifest
from mercury_onnx.formats import codec_wire
from mercury_onnx.runtime.client import Client, RequestRejected, build_request, parse_response
from mercury_onnx.runtime.head import Head
from mercury_onnx.formats.images import preprocess
from mercury_onnx.runtime.server import spawn
from mercury_onnx.runtime.tail import Tail, model_name


@pytest.fixture(scope="module")
def served(codec_export):
    proc, url = spawn(codec_export, "--provider", "cpu")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def ref(codec_export, cifar_test):
    m = load_manifest(codec_export)
    images = sorted(cifar_test.glob("*/0002.jpg"))[:4]
    head = Head(codec_export, 0.25, manifest=m, codec="16x4")
    tail = Tail(codec_export, 0.25, provider="cpu", manifest=m, codec="16x4")
    out = head(preprocess(images, m["preprocess"]))
    return dict(manifest=m, images=images, head=head, tail=tail, out=out,
                logits=tail(out["codes"], out["indices"]), model=model_name(16, "16x4"))


def _post(url, model, inputs, params):
    body, hlen = build_request(inputs, params)
    return httpx.post(f"{url}/v2/models/{model}/infer", content=body, timeout=10,
                      headers={"Inference-Header-Content-Length": str(hlen)})


def test_client_codec_matches_local_codec_tail(codec_export, served, ref):
    assert ref["out"]["codes"].dtype == np.uint8 and ref["out"]["codes"].shape == (4, 17, 16)
    client = Client(codec_export, served, keep_ratio=0.25, fallback="none", timeout=10, codec="16x4")
    preds = client.predict(ref["images"])
    client.close()
    got = np.stack([p.logits for p in preds])
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4)       # same codes, same tail
    b = preds[0].breakdown
    assert [p.where for p in preds] == ["split"] * 4
    assert 0 < b["codec_payload_bytes"] < 4 * (1 + 16) * 16 // 2 + 4 * 8 + 28   # below raw 4-bit codes + mask + header


def test_raw_codes_input_as_triton_would(served, ref):
    m, c = ref["manifest"], ref["head"].codec
    r = _post(served, ref["model"], {"codes": ref["out"]["codes"], "indices": ref["out"]["indices"]},
              {"model_id": m["model_id"], "codec_id": c["codec_id"]})
    assert r.status_code == 200, r.text
    _, out = parse_response(r.content, r.headers.get("inference-header-content-length"))
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-4)


def test_codec_mismatch_refused_409(served, ref):
    m, c = ref["manifest"], ref["head"].codec
    codes, idx = ref["out"]["codes"][:1], ref["out"]["indices"][:1]
    dic = codec_wire.load_dictionary(ref["head"].export_dir, c)
    other = codec_wire.encode(codes, idx, m["num_patches"], 4, m["model_id"], "00c0ffee", dic)
    r = _post(served, ref["model"], {"payload": np.frombuffer(other, np.uint8)}, {"model_id": m["model_id"]})
    assert r.status_code == 409 and "different" in r.json()["error"] and "00c0ffee" in r.json()["error"]
    r = _post(served, ref["model"], {"payload": np.frombuffer(other, np.uint8)},
              {"model_id": m["model_id"], "codec_id": "00c0ffee"})
    assert r.status_code == 409 and "codec id" in r.json()["error"]
    wrong_model = codec_wire.encode(codes, idx, m["num_patches"], 4, "0" * 16, c["codec_id"], dic)
    r = _post(served, ref["model"], {"payload": np.frombuffer(wrong_model, np.uint8)}, {"model_id": m["model_id"]})
    assert r.status_code == 409 and "0000000000000000" in r.json()["error"]
    good = codec_wire.encode(codes, idx, m["num_patches"], 4, m["model_id"], c["codec_id"], dic)
    bad = bytearray(good)
    bad[-1] ^= 0x10                                                    # corrupted in transit
    r = _post(served, ref["model"], {"payload": np.frombuffer(bytes(bad), np.uint8)}, {"model_id": m["model_id"]})
    assert r.status_code == 400 and "checksum" in r.json()["error"]
    r = _post(served, ref["model"], {"payload": np.frombuffer(good[:-3], np.uint8)}, {"model_id": m["model_id"]})
    assert r.status_code == 400 and "bad codec payload" in r.json()["error"]
    r = _post(served, ref["model"], {"payload": np.frombuffer(good, np.uint8)}, {"model_id": m["model_id"]})
    assert r.status_code == 200
    assert httpx.get(f"{served}/v2/health/ready").status_code == 200


def test_client_with_other_codec_is_refused(codec_export, served, ref, tmp_path):
    """A device whose export holds a different codec (another basis) gets a clear refusal."""
    import json
    import shutil

    from mercury_onnx.formats.manifest import sha256_file

    dev = tmp_path / "device_export"
    shutil.copytree(codec_export, dev)
    man = json.loads((dev / "manifest.json").read_text())
    for v in man["variants"]:
        for c in v["codecs"]:
            c["codec_id"] = "feedf00d"                                # e.g. a re-fitted basis
    (dev / "manifest.json").write_text(json.dumps(man))
    client = Client(dev, served, keep_ratio=0.25, fallback="none", timeout=10, codec="16x4")
    with pytest.raises(RequestRejected, match="409.*codec"):
        client.predict(ref["images"][:1])
    client.close()
    res = CliRunner().invoke(app, ["infer", str(ref["images"][0]), "--export", str(dev), "--server", served,
                                   "-r", "0.25", "--codec", "16x4", "--fallback", "none"])
    assert res.exit_code != 0 and "409" in res.output and "Traceback" not in res.output
    assert sha256_file(dev / "manifest.json")


def test_infer_cli_codec_and_unknown_codec(codec_export, served, ref):
    res = CliRunner().invoke(app, ["infer", str(ref["images"][0]), "--export", str(codec_export),
                                   "--server", served, "-r", "0.25", "--codec", "16x4"])
    assert res.exit_code == 0, res.output
    assert "codec 16x4" in res.output and "codec payload" in res.output
    res = CliRunner().invoke(app, ["infer", str(ref["images"][0]), "--export", str(codec_export),
                                   "--server", served, "-r", "0.25", "--codec", "8x2"])
    assert res.exit_code != 0 and "no codec 8x2" in res.output and "Traceback" not in res.output


def test_entropy_codec_end_to_end(codec_export, served, ref):
    """e4: the client sends the entropy-coded payload, serve-tail decodes it with the export's
    tables and answers the local e4 head + tail's logits; sent to the 16x4 model it is refused."""
    m = ref["manifest"]
    head = Head(codec_export, 0.25, manifest=m, codec="e4")
    tail = Tail(codec_export, 0.25, provider="cpu", manifest=m, codec="e4")
    out = head(preprocess(ref["images"], m["preprocess"]))
    local = tail(out["codes"], out["indices"])
    client = Client(codec_export, served, keep_ratio=0.25, fallback="none", timeout=10, codec="e4")
    preds = client.predict(ref["images"])
    client.close()
    np.testing.assert_allclose(np.stack([p.logits for p in preds]), local, atol=1e-4)
    assert [p.where for p in preds] == ["split"] * 4 and head.codec["kind"] == "entropy"
    tables = codec_wire.load_dictionary(codec_export, head.codec)
    payload = codec_wire.encode(out["codes"][:1], out["indices"][:1], m["num_patches"], 8, m["model_id"],
                                head.codec["codec_id"], tables)
    r = _post(served, model_name(16, "e4"), {"payload": np.frombuffer(payload, np.uint8)}, {"model_id": m["model_id"]})
    assert r.status_code == 200, r.text
    r = _post(served, ref["model"], {"payload": np.frombuffer(payload, np.uint8)}, {"model_id": m["model_id"]})
    assert r.status_code == 409 and "different" in r.json()["error"]
    res = CliRunner().invoke(app, ["infer", str(ref["images"][0]), "--export", str(codec_export),
                                   "--server", served, "-r", "0.25", "--codec", "e4"])
    assert res.exit_code == 0 and "codec e4" in res.output, res.output


def test_triton_repo_has_codec_tails(codec_export, ref, tmp_path):
    """The Triton repository serves each codec tail: UINT8 codes [1+K, d], the codec id in its
    config, and the config's tensors are the graph's (run through ORT with them)."""
    pytest.importorskip("tritonclient")
    import onnxruntime as ort

    from mercury_onnx.export.triton import parse_config, write_triton_repo

    repo = write_triton_repo(codec_export, tmp_path / "repo")
    d = repo / "mercury_tail_k16_c16x4"
    cfg = parse_config(d / "config.pbtxt")
    assert cfg.name == "mercury_tail_k16_c16x4"
    codes, idx = cfg.input
    assert (codes.name, list(codes.dims), idx.name, list(idx.dims)) == ("codes", [17, 16], "indices", [16])
    assert cfg.parameters["codec_id"].string_value == ref["head"].codec["codec_id"]
    assert cfg.parameters["model_id"].string_value == ref["manifest"]["model_id"]
    sess = ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name: i.type for i in sess.get_inputs()} == {"codes": "tensor(uint8)", "indices": "tensor(int64)"}
    logits = sess.run(["logits"], {"codes": ref["out"]["codes"], "indices": ref["out"]["indices"]})[0]
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-5)
    assert (repo / "mercury_tail_k16" / "config.pbtxt").exists()
