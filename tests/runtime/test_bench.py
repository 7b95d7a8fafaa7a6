"""bench end to end: the JSON contract, the arithmetic, and a tiny CLI run on a real export."""
from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.runtime import bench as B
from mercury_onnx.runtime import bench_setup as BS
from mercury_onnx.runtime.network import load_trace
from mercury_onnx.runtime.profiles import pi_profile, rtx4090_cloud
from tests.conftest import CIFAR_TEST, TRACES

ROW_KEYS = {"trace", "method", "keep_ratio", "token_dtype", "latency_ms", "breakdown_ms", "payload_bytes",
            "energy_mj", "top1", "measured"}
needs_data = pytest.mark.skipif(not (TRACES.exists() and CIFAR_TEST.exists()), reason="shared data missing")


def check_contract(report, traces):
    assert isinstance(report["device"], str)
    methods = {r["method"] for r in report["results"]}
    assert methods == set(B.METHODS)
    for r in report["results"]:
        assert set(r) == ROW_KEYS and r["trace"] in traces
        assert set(r["latency_ms"]) == {"p50", "p95", "mean"}
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"]
        assert isinstance(r["payload_bytes"], int) and isinstance(r["energy_mj"], float)
        assert sum(r["breakdown_ms"].values()) == pytest.approx(r["latency_ms"]["mean"], rel=1e-6)
        if r["method"] in ("mercury", "janus-like"):
            assert r["token_dtype"] in ("fp16", "int8") and 0 < r["keep_ratio"] < 1
        if r["method"] == "mobile-only":
            assert r["payload_bytes"] == 0 and r["breakdown_ms"]["transmission"] == 0


@needs_data
def test_modelled_deit_b_on_the_pi():
    setup = BS.setup_from_name("deit_base_patch16_224", [0.25])
    images = B.sample_images(CIFAR_TEST, 8)
    cfg = B.BenchConfig(traces=[load_trace("lte-driving"), load_trace("const:50mbps:30ms")], requests=200)
    report, curves = B.run_bench(setup, pi_profile(), rtx4090_cloud(), images, cfg, [])
    check_contract(report, {"lte-driving", "const:50mbps:30ms"})
    rows = {(r["trace"], r["method"], r["token_dtype"]): r for r in report["results"]}
    mob = rows[("lte-driving", "mobile-only", None)]
    assert mob["latency_ms"]["mean"] == pytest.approx(5.06 * 407, rel=1e-6)   # the paper's Pi figure
    m8 = rows[("const:50mbps:30ms", "mercury", "int8")]
    # payload: 40 B header + 50 x 768 int8 + 50 f32 scales + 49 int16 indices
    assert m8["payload_bytes"] == 40 + 50 * 768 + 50 * 4 + 49 * 2
    b = m8["breakdown_ms"]
    assert b["transmission"] == pytest.approx(m8["payload_bytes"] * 8 / 50e6 * 1e3)
    assert b["rtt"] == pytest.approx(30.0) and b["cloud_compute"] < 1.0
    assert m8["measured"] == ["payload_bytes"]
    # the JPEG sizes are real encodings of the images at 224x224
    jpeg = rows[("const:50mbps:30ms", "cloud-only-jpeg", None)]
    sizes, _ = B.jpeg_sizes(images, (224, 224))
    assert jpeg["payload_bytes"] == pytest.approx(sizes.mean(), rel=0.25)
    assert set(curves["lte-driving"]) >= {"mobile-only", "mercury-adaptive"}
    # Mercury vs mobile-only by mean and by median, per trace and pooled over both traces
    vs = report["mercury_vs_mobile"]["mercury r=0.25 int8"]
    assert vs["per_trace"]["const:50mbps:30ms"]["mean"] == pytest.approx(
        mob["latency_ms"]["mean"] / m8["latency_ms"]["mean"])
    assert vs["per_trace"]["const:50mbps:30ms"]["p50"] == pytest.approx(
        mob["latency_ms"]["p50"] / m8["latency_ms"]["p50"])
    lte = rows[("lte-driving", "mercury", "int8")]["latency_ms"]["mean"]
    assert vs["pooled_mean"] == pytest.approx(2 * mob["latency_ms"]["mean"] / (lte + m8["latency_ms"]["mean"]))


def test_eval_json_lookup(tmp_path):
    evals = [{"method": "vanilla", "pruning": "none", "reconstruction": "none", "keep_ratio": 1.0, "top1": 0.6},
             {"method": "mercury", "pruning": "regional", "reconstruction": "meta-ctx", "keep_ratio": 0.25, "top1": 0.5},
             {"method": "janus", "pruning": "janus", "reconstruction": "none", "keep_ratio": 0.25, "top1": 0.4}]
    assert B.lookup_top1(evals, "cloud-only-jpeg", None, None) == 0.6
    assert B.lookup_top1(evals, "mercury", 0.25, "int8") == 0.5
    assert B.lookup_top1(evals, "janus-like", 0.25, "fp16") == 0.4
    assert B.lookup_top1(evals, "mercury", 0.5, "fp16") is None
    # an export with another reconstruction gets the row of that reconstruction when there is one
    evals.append({"method": "regional+meta-local", "pruning": "regional", "reconstruction": "meta-local",
                  "keep_ratio": 0.25, "top1": 0.55})
    evals.append({"method": "score=similarity", "pruning": "regional", "reconstruction": "meta-ctx",
                  "keep_ratio": 0.25, "top1": 0.56})
    assert B.lookup_top1(evals, "mercury", 0.25, "int8", "meta-local") == 0.55
    assert B.lookup_top1(evals, "mercury", 0.25, "int8", "meta-ctx") == 0.5
    assert B.lookup_top1(evals, "mercury", 0.25, "int8") == 0.5
    f = tmp_path / "bad.json"
    f.write_text("[]")
    with pytest.raises(BS.BenchError, match="eval JSON"):
        B.load_eval(f)


@needs_data
def test_bench_cli_on_the_reference_export(ref_export, tmp_path):
    out, plots, ev = tmp_path / "bench.json", tmp_path / "plots", tmp_path / "eval.json"
    ks = [v["keep_tokens"] / 64 for v in json.loads((ref_export / "manifest.json").read_text())["variants"]]
    rows = [{"method": "vanilla", "pruning": "none", "reconstruction": "none", "keep_ratio": 1.0, "top1": 0.6}]
    for k in ks:
        rows += [{"method": "mercury", "pruning": "regional", "reconstruction": "meta-ctx", "keep_ratio": k, "top1": 0.5},
                 {"method": "janus+meta-ctx", "pruning": "janus", "reconstruction": "meta-ctx", "keep_ratio": k,
                  "top1": 0.4}]
    ev.write_text(json.dumps({"dataset": "cifar10/test", "images": 500, "results": rows}))
    t = time.time()
    r = CliRunner().invoke(app, ["bench", str(ref_export), "--device", "host", "--cloud", "local",
                                 "-t", "lte-driving", "-t", "mahimahi:TMobile-LTE-short", "--requests", "60",
                                 "--jpeg-images", "8", "--hq-size", "256", "--slo-ms", "80", "--eval-json", str(ev),
                                 "--json", str(out), "--plot-dir", str(plots)])
    assert r.exit_code == 0, r.output
    assert time.time() - t < 120
    report = json.loads(out.read_text())
    check_contract(report, {"lte-driving", "mahimahi:TMobile-LTE-short"})
    assert report["device"] == "host" and report["device_profile"]["measured_gflops"]
    rows = [x for x in report["results"] if x["method"] in ("mobile-only", "mercury")]
    assert all("device_compute" in x["measured"] for x in rows)      # measured on this host
    assert all("cloud_compute" in x["measured"] for x in rows if x["method"] == "mercury")
    assert report["planner"]["lte-driving"]["planner"]["slo_violation_rate"] is not None
    assert (plots / "latency_cdf_lte-driving.png").stat().st_size > 1000
    assert (plots / "accuracy_vs_latency.png").stat().st_size > 1000
    # accuracy from the eval JSON, Janus-like included, and where it came from
    top1 = {x["method"]: x["top1"] for x in report["results"]}
    assert top1["janus-like"] == 0.4 and top1["mercury"] == 0.5 and top1["cloud-only-jpeg"] == 0.6
    assert 0.4 < top1["mercury-adaptive"] <= 0.6
    assert report["accuracy_source"] == {"file": str(ev), "dataset": "cifar10/test", "images": 500}
    assert "top1 from" in r.output and "0.4000" in r.output
    assert "speed-up" in r.output and "mercury-adaptive" in r.output


def test_bench_cli_errors():
    runner = CliRunner()
    r = runner.invoke(app, ["bench"])
    assert r.exit_code == 2 and "EXPORT_DIR or --model" in r.output
    r = runner.invoke(app, ["bench", "--model", "deit_tiny_patch16_224", "-t", "6g"])
    assert r.exit_code == 2 and "unknown trace" in r.output
    r = runner.invoke(app, ["bench", "--model", "deit_tiny_patch16_224", "--device", "host"])
    assert r.exit_code == 2 and "EXPORT_DIR" in r.output


def test_planner_with_an_slo_is_compared_at_its_accuracy():
    fixed = {"jpeg": {"mean_accuracy": 0.586, "slo_violation_rate": 0.46, "mean_latency_ms": 48.0},
             "m50": {"mean_accuracy": 0.590, "slo_violation_rate": 0.544, "mean_latency_ms": 53.0},
             "m25": {"mean_accuracy": 0.574, "slo_violation_rate": 0.10, "mean_latency_ms": 40.0}}
    # at 0.590 only m50 is accurate enough; at 0.586 a 25/75 blend of m25 and m50 (43.3%)
    # beats jpeg (46%), unless jpeg misses less
    assert B.best_at_accuracy(fixed, 0.590)[0] == "m50"
    assert B.best_at_accuracy(fixed, 0.586)[0] == "25.0% m25 + 75.0% m50"
    assert B.best_at_accuracy({**fixed, "jpeg": {**fixed["jpeg"], "slo_violation_rate": 0.40}}, 0.586)[0] == "jpeg"
    # at 0.5861, a blend of m25 and m50 (24.4% / 75.6%) reaches it with 43.6% violations
    label, best = B.best_at_accuracy(fixed, 0.5861)
    assert label == "24.4% m25 + 75.6% m50"
    assert best["mean_accuracy"] == pytest.approx(0.5861)
    assert best["slo_violation_rate"] == pytest.approx(0.24375 * 0.10 + 0.75625 * 0.544)
