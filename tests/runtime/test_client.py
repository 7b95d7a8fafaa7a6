"""The device client and `mercury-onnx infer`: split inference against a real serve-tail, and
bounded, honest behaviour when the server dies or stalls (local fallback or a clear error)."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.formats.manifest import load_manifest
from mercury_onnx.runtime.client import Client, ServerError
from mercury_onnx.runtime.head import FullModel, Head
from mercury_onnx.formats.images import preprocess
from mercury_onnx.runtime.server import free_port, spawn
from mercury_onnx.runtime.tail import Tail


@pytest.fixture(scope="module")
def images(cifar_test):
    return sorted(cifar_test.glob("*/0001.jpg"))[:3]


def _serve(export_dir):
    proc, url = spawn(export_dir, "--provider", "cpu")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def server(export_dir):
    yield from _serve(export_dir)


@pytest.fixture()
def doomed_server(export_dir):
    """A server of its own, for tests that kill or stop it."""
    yield from _serve(export_dir)


@pytest.mark.parametrize("token_dtype", ["fp16", "int8"])
def test_split_prediction_matches_local_head_and_tail(export_dir, server, images, token_dtype):
    _, url = server
    client = Client(export_dir, url, keep_ratio=0.25, token_dtype=token_dtype, fallback="none", timeout=10)
    preds = client.predict(images)
    client.close()
    m = load_manifest(export_dir)
    out = Head(export_dir, 0.25, manifest=m)(preprocess(images, m["preprocess"]))
    local = Tail(export_dir, 0.25, provider="cpu", manifest=m)(out["tokens"], out["indices"])
    got = np.stack([p.logits for p in preds])
    assert [p.where for p in preds] == ["split"] * 3
    np.testing.assert_allclose(got, local, atol=0.05 if token_dtype == "int8" else 0.02)
    assert (got.argmax(1) == local.argmax(1)).all()
    b = preds[0].breakdown
    assert b["server_tail"] > 0 and b["round_trip"] > b["server_tail"] and b["head"] > 0
    probs = [p for _, p in preds[0].top5]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_server_killed_mid_run_falls_back_or_fails_within_timeout(export_dir, doomed_server, images):
    proc, url = doomed_server
    client = Client(export_dir, url, fallback="local", timeout=2)
    strict = Client(export_dir, url, fallback="none", timeout=2)
    assert client.predict(images[:1])[0].where == "split"
    proc.kill()
    proc.wait(10)
    t = time.perf_counter()
    pred = client.predict(images)
    assert time.perf_counter() - t < 10
    m = load_manifest(export_dir)
    full = FullModel(export_dir, manifest=m)(preprocess(images, m["preprocess"]))
    assert [p.where for p in pred] == ["local"] * 3 and "server unavailable" in pred[0].note
    np.testing.assert_allclose(np.stack([p.logits for p in pred]), full, atol=1e-5)
    t = time.perf_counter()
    with pytest.raises(ServerError, match="cannot reach"):
        strict.predict(images)
    assert time.perf_counter() - t < 5


def test_stalled_server_times_out(export_dir, doomed_server, images):
    proc, url = doomed_server
    os.kill(proc.pid, signal.SIGSTOP)       # accepts connections (kernel backlog) but never answers
    try:
        client = Client(export_dir, url, fallback="local", timeout=1)
        t = time.perf_counter()
        pred = client.predict(images[:1])
        assert time.perf_counter() - t < 8
        assert pred[0].where == "local" and "did not answer" in pred[0].note
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_infer_cli(export_dir, server, images):
    _, url = server
    r = CliRunner().invoke(app, ["infer", *map(str, images[:2]), "--export", str(export_dir), "--server", url,
                                 "--token-dtype", "int8", "--fallback", "none", "--timeout", "10"])
    assert r.exit_code == 0, r.output
    assert r.output.count("%") >= 10 and "head" in r.output and "in the server" in r.output
    assert "round trip" in r.output


def test_infer_cli_fallback_and_errors(export_dir, images, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"                         # nothing listens there
    runner = CliRunner()
    r = runner.invoke(app, ["infer", str(images[0]), "--export", str(export_dir), "--server", dead, "--timeout", "2"])
    assert r.exit_code == 0 and "fallback" in r.output and "full model locally" in r.output, r.output
    r = runner.invoke(app, ["infer", str(images[0]), "--export", str(export_dir), "--server", dead,
                            "--fallback", "none", "--timeout", "2"])
    assert r.exit_code == 2 and "cannot reach" in r.output
    r = runner.invoke(app, ["infer", str(tmp_path / "nope.jpg"), "--export", str(export_dir), "--server", dead])
    assert r.exit_code == 2 and "image not found" in r.output
    r = runner.invoke(app, ["infer", str(images[0]), "--export", str(tmp_path), "--server", dead])
    assert r.exit_code == 2 and "no manifest.json" in r.output
