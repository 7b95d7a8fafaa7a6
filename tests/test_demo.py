"""`mercury-onnx demo` end to end on a tiny budget: calibrate, export, serve-tail, client, bench."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.demo import REF_MODEL, pick_images
from tests.conftest import CIFAR_TEST, TRACES


def test_pick_images_round_robins_classes(cifar_test):
    classes = sorted(d.name for d in cifar_test.iterdir())
    paths, labels = pick_images(cifar_test, 25, classes)
    assert len(paths) == 25 and sorted(set(labels)) == list(range(10))
    assert all(p.parent.name == classes[y] for p, y in zip(paths, labels))


@pytest.mark.skipif(not (REF_MODEL.exists() and CIFAR_TEST.exists() and TRACES.exists()),
                    reason="reference model / CIFAR-10 / traces not in ../shared")
def test_demo_tiny(tmp_path):
    """~1-2 min on 2 cores: 64 calibration images, 1 step, 8 test images, 100 bench requests.
    Not marked slow on purpose: this is the README's main job, and CI must run it (small N)."""
    r = CliRunner().invoke(app, ["demo", "--images", "8", "--calib-images", "64", "--calib-steps", "1",
                                 "--requests", "100", "--cache", str(tmp_path)])
    assert r.exit_code == 0, r.output
    client = json.loads((tmp_path / "results" / "client.json").read_text())
    assert len(client) == 5                              # vanilla + two keep ratios x (int8 tokens, codec 16x4)
    for row in client.values():
        assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["agree"] <= 1.0
    split = [v for k, v in client.items() if "split" in k]
    assert all(v["ms"]["payload_bytes"] > 0 and v["ms"]["round_trip"] > 0 for v in split)
    for keep in (0.5, 0.25):   # the codec's real payloads: a small fraction of the int8 tokens'
        codec, tok = client[f"mercury r={keep} codec 16x4 (split)"], client[f"mercury r={keep} int8 (split)"]
        assert codec["ms"]["payload_bytes"] < 0.2 * tok["ms"]["payload_bytes"], (codec["ms"], tok["ms"])
    bench = json.loads((tmp_path / "results" / "bench.json").read_text())
    assert {x["trace"] for x in bench["results"]} == {"5g-driving"}
    mercury = [x for x in bench["results"] if x["method"] == "mercury"]
    assert mercury and all("cloud_compute" in x["measured"] for x in mercury)
    # the bench table carries the split's top-1 measured in step 4 (same keep ratio and token dtype)
    for x in mercury:
        if x["token_dtype"] == "int8":
            assert x["top1"] == client[f"mercury r={x['keep_ratio']} int8 (split)"]["top1"]
        if x["token_dtype"] == "c16x4":
            assert x["top1"] == client[f"mercury r={x['keep_ratio']} codec 16x4 (split)"]["top1"]
    assert {x["token_dtype"] for x in mercury} >= {"int8", "c16x4"}
    assert (tmp_path / "results" / "latency_cdf_5g-driving.png").exists()
    # where the split pays: the constant-rate band, for this export and DeiT-B (Pi profile)
    assert "band_mbps" in bench["band"]["mercury"] and "where the split pays" in r.output
    assert "deit_base_patch16_224" in r.output
    assert "mercury" in json.loads((tmp_path / "results" / "band_deit_b.json").read_text())
    assert "calibrate" in r.output and "demo done" in r.output
    assert list(tmp_path.glob("calib-*.json")) and list(tmp_path.glob("export-*/manifest.json"))
    # a second run reuses the calibration and the export
    r2 = CliRunner().invoke(app, ["demo", "--images", "4", "--calib-images", "64", "--calib-steps", "1",
                                  "--requests", "50", "--cache", str(tmp_path)])
    assert r2.exit_code == 0, r2.output
    assert "calibrate: cached" in r2.output and "export: cached" in r2.output
