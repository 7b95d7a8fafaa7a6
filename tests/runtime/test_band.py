"""bench with codec variants (real encoded payloads), the planner with them on all 9 traces,
and bench --band: the constant-rate band where Mercury beats mobile-only and cloud-only-jpeg."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.formats import codec_wire
from mercury_onnx.runtime import bench as B
from mercury_onnx.runtime.band import RATES_MBPS, compute_band
from mercury_onnx.runtime.bench_setup import setup_from_export
from mercury_onnx.runtime.head import Head
from mercury_onnx.runtime.network import available_traces, load_trace
from mercury_onnx.formats.images import preprocess
from mercury_onnx.runtime.profiles import pi_profile, rtx4090_cloud
from tests.conftest import CIFAR_TEST, TRACES

needs_data = pytest.mark.skipif(not (TRACES.exists() and CIFAR_TEST.exists()), reason="shared data missing")
ALL_TRACES = [t for t in available_traces(TRACES) if not t.startswith("const:")]


def _strategy(method, device_ms, payload, cloud_ms=0.0, r=None):
    return B.Strategy(method, r, "int8" if r else None, device_ms, np.array([float(payload)]), cloud_ms, None)


def test_band_arithmetic():
    """mobile 100 ms; JPEG 10 kB, no device time; Mercury 1 kB after 20 ms on the device; RTT 10 ms.
    Mercury beats mobile when 20 + 8000/R + 10 < 100 (R > 114 kbps) and JPEG when
    20 + 8000/R < 80000/R (R < 3.6 Mbps), R in bit/ms = kbps."""
    sts = [_strategy("mobile-only", 100, 0), _strategy("cloud-only-jpeg", 0, 10_000),
           _strategy("mercury", 20, 1_000, r=0.25)]
    band = compute_band(sts, rtt_ms=10.0)
    lo, hi = band["strategies"]["mercury r=0.25 int8"]["band_mbps"]
    assert (lo, hi) == (pytest.approx(8 / 70), pytest.approx(72 / 20))                 # exact crossings
    assert band["strategies"]["mercury r=0.25 int8"]["grid_wins"] == ((RATES_MBPS > lo) & (RATES_MBPS < hi)).sum()
    assert band["mercury"]["band_mbps"] == [lo, hi]
    sts[2] = _strategy("mercury", 20, 20_000, r=0.25)                 # bigger than the JPEG: never fastest
    assert compute_band(sts, 10.0)["mercury"]["band_mbps"] is None


@needs_data
def test_codec_strategies_payloads_planner_and_band_on_all_traces(codec_export):
    setup = setup_from_export(codec_export)
    images = B.sample_images(CIFAR_TEST, 12)
    traces = [load_trace(t, TRACES) for t in ALL_TRACES]
    assert len(traces) == 9
    cfg = B.BenchConfig(traces=traces, requests=500, band=True)     # 10 streams a trace: fewer are noisy
    report, _ = B.run_bench(setup, pi_profile(), rtx4090_cloud(), images, cfg, [])
    # codec variants are Mercury strategies with the real bytes of these images through the codec head
    st = {s.label: s for s in B.build_strategies(setup, pi_profile(), rtx4090_cloud(), images, 1024, [])}
    m = setup.manifest
    head = Head(codec_export, 0.25, manifest=m, codec="16x4")
    c = head.codec
    out = head(preprocess(images, m["preprocess"]))
    dic = codec_wire.load_dictionary(codec_export, c)
    want = [len(codec_wire.encode(out["codes"][i:i + 1], out["indices"][i:i + 1], 64, 4, m["model_id"],
                                  c["codec_id"], dic)) for i in range(len(images))]
    assert st["mercury r=0.25 c16x4"].payload.tolist() == want
    assert np.mean(want) < 400 < st["mercury r=0.25 int8"].payload.mean() / 8
    # the planner has the codec variants among its candidates and is never worse on any trace
    for name, rep in report["planner"].items():
        assert "mercury r=0.25 c16x4" in rep["fixed"], name
        assert rep["never_worse"], (name, rep["best_fixed"], rep["planner"], rep["best"])
    # the band: every rate inside is one where the variant beats both rivals
    band = report["band"]
    rates = np.array(band["rates_mbps"])
    rival = np.minimum(band["strategies"]["mobile-only"]["latency_ms"], band["strategies"]["cloud-only-jpeg"]["latency_ms"])
    for label, row in band["strategies"].items():
        if row["method"] != "mercury":
            continue
        wins = np.array(row["latency_ms"]) < rival
        b = row["band_mbps"]
        if b is None:
            assert not wins.any()
        else:                                   # the grid agrees with the exact edges
            assert wins[(rates > b[0] * 1.0001) & (rates < b[1] * 0.9999)].all()
            assert not wins[(rates < b[0] * 0.9999) | (rates > b[1] * 1.0001)].any()
    assert band["rtt_ms"] == pytest.approx(np.concatenate([t.rtt_ms for t in traces]).mean())


@needs_data
def test_bench_band_cli(codec_export, tmp_path):
    out, plots = tmp_path / "b.json", tmp_path / "plots"
    r = CliRunner().invoke(app, ["bench", str(codec_export), "--device", "pi", "-t", "lte-driving",
                                 "--requests", "40", "--jpeg-images", "8", "--band", "--json", str(out),
                                 "--plot-dir", str(plots)])
    assert r.exit_code == 0, r.output
    assert "Band (constant uplink" in r.output and "mercury r=0.25 c16x4" in r.output
    band = json.loads(out.read_text())["band"]
    assert "band_mbps" in band["mercury"] and (plots / "band.png").stat().st_size > 1000


def test_flat_photo_folder_and_held_out_images():
    """../shared/data/imagenet-sample is a flat folder: the exporter reads it as one class, and the
    bench can leave out the photos a codec was fit on (--images-skip)."""
    from mercury_onnx.export.images import load_images
    from mercury_onnx.formats.images import list_images as folder_list

    photos = TRACES.parent / "imagenet-sample"
    if not photos.exists():
        pytest.skip("imagenet-sample not in ../shared")
    paths, labels, classes = folder_list(photos)
    assert len(paths) >= 500 and classes == [""] and set(labels) == {0}
    x, y = load_images(photos, 4, (224, 224), (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (4, 3, 224, 224) and y is None
    held = B.sample_images(photos, 64, skip=250)
    assert len(held) == 64 and held[0] == sorted(paths)[250]
    assert B.default_images((224, 224), TRACES.parent) == photos
    assert B.default_images((32, 32), TRACES.parent) == TRACES.parent / "cifar10" / "test"
