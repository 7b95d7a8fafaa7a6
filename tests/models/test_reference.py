"""The calibration shipped for the reference backbone: it loads, it belongs to the backbone
whose sha256 it records, and any other backbone is refused.

The mechanism is tested on a calibration written the way benchmarks/ship_reference.py writes
the real one (models/ship.py), into a temporary folder; the files actually shipped in
mercury_onnx/data/reference/ are checked by the last tests."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.models import ConfigError, MercuryConfig, build_mercury, reference, ship
from mercury_onnx.models.checkpoint import (is_mercury_checkpoint, mercury_from_any, read_checkpoint_json,
                                            save_mercury)
from mercury_onnx.runtime import shipped as runtime_shipped

from ..conftest import ROOT

SHIPPED = reference.META_JSON.exists()


@pytest.fixture
def shipped(ref_json, tmp_path, monkeypatch):
    """A shipped calibration of the reference backbone (K=32, 16) with seeded non-zero meta."""
    models = mercury_from_any(str(ref_json), keep_ratios=[0.5, 0.25])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in models:
            for p in m.recon.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    report = {"steps": 0, "per_keep_tokens": {str(m.keep): {"temperature": 1.0} for m in models}}
    save_mercury(tmp_path / "ck", models, calibration=report)
    data = tmp_path / "data"
    ship.write(tmp_path / "ck", ref_json, out_dir=data)
    monkeypatch.setattr(reference, "META_JSON", data / "reference.json")
    monkeypatch.setattr(reference, "META_WEIGHTS", data / "reference.safetensors")
    monkeypatch.setattr(runtime_shipped, "SHIPPED_JSON", data / "reference.json")
    return models


def test_loads_and_matches_its_recorded_backbone_hash(shipped, ref_json):
    meta = reference.info()
    weights = reference.backbone_weights(ref_json)
    assert meta["backbone"]["file"] == weights.name and reference.sha256_file(weights) == meta["backbone"]["sha256"]
    assert set(load_file(str(reference.META_WEIGHTS))) == {f"meta.{m.keep}.{n}" for m in shipped
                                                           for n in m.recon.state_dict()}   # no backbone copy
    models = mercury_from_any(f"reference:{ref_json}", keep_ratios=[0.5, 0.25])
    assert [m.keep for m in models] == [32, 16] and models[0].backbone is models[1].backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        for got, want in zip(models, shipped):
            for n, v in got.recon.state_dict().items():
                assert torch.equal(v, want.recon.state_dict()[n]), n
            assert torch.equal(got(x), want(x))


def test_the_reference_backbone_json_selects_the_shipped_calibration(shipped, ref_json):
    assert reference.shipped_source(str(ref_json), [0.5, 0.25]) == f"reference:{ref_json}"
    assert reference.shipped_source(str(ref_json), [0.3]) == str(ref_json)     # not shipped: calibrate it
    assert is_mercury_checkpoint(f"reference:{ref_json}")
    assert read_checkpoint_json(f"reference:{ref_json}")["keep_tokens"] == [32, 16]


@pytest.fixture
def other_backbone(ref_json, tmp_path):
    """The reference backbone JSON beside weights with one number changed."""
    shutil.copy(ref_json, tmp_path / "other.json")
    sd = load_file(str(reference.backbone_weights(ref_json)))
    sd["head.bias"] = sd["head.bias"].clone() + 1e-3
    save_file(sd, str(tmp_path / "other.safetensors"))
    return tmp_path / "other.json"


def test_a_different_backbone_is_refused(shipped, other_backbone):
    with pytest.raises(ConfigError, match="is not the reference backbone"):
        mercury_from_any(f"reference:{other_backbone}", keep_ratios=[0.5])
    assert reference.shipped_source(str(other_backbone), [0.5]) == str(other_backbone)   # never auto-selected
    r = CliRunner().invoke(app, ["info", "--model", f"reference:{other_backbone}"])
    assert r.exit_code == 2 and "is not the reference backbone" in r.output and "Traceback" not in r.output
    with pytest.raises(ConfigError, match="reference backbone not found"):
        mercury_from_any(f"reference:{other_backbone.parent / 'nope.json'}")


def test_write_refuses_a_checkpoint_of_another_backbone(ref_json, other_backbone, tmp_path):
    models = mercury_from_any(str(other_backbone), keep_ratios=[0.5])
    save_mercury(tmp_path / "ck", models)
    with pytest.raises(ConfigError, match="backbone differs"):
        ship.write(tmp_path / "ck", ref_json, out_dir=tmp_path / "data")


def test_bench_uses_the_committed_accuracy_of_an_export_of_it(shipped):
    meta = reference.info()
    meta["accuracy"] = {"dataset": "cifar10/test", "images": 10000,
                        "results": [{"method": "mercury", "keep_ratio": 0.5, "top1": 0.6}]}
    reference.META_JSON.write_text(json.dumps(meta))
    manifest = {"source": "reference:x.json", "calibration": meta["calibration"]}
    rows, src = runtime_shipped.shipped_accuracy(manifest)
    assert rows == meta["accuracy"]["results"] and src["images"] == 10000
    assert runtime_shipped.shipped_accuracy({**manifest, "calibration": {"steps": 1}}) is None   # another calibration
    assert runtime_shipped.shipped_accuracy({"source": "ck.json"}) is None


@pytest.mark.skipif(not SHIPPED, reason="no calibration shipped yet: benchmarks/reproduce.sh calibration")
def test_the_shipped_files_belong_to_the_reference_backbone(ref_json):
    meta = reference.info()
    assert reference.sha256_file(reference.backbone_weights(ref_json)) == meta["backbone"]["sha256"]
    cal = meta["calibration"]
    assert sorted(cal["per_keep_tokens"], key=int) == sorted(map(str, meta["keep_tokens"]), key=int)
    for k, rep in cal["per_keep_tokens"].items():       # what each ratio used, and its held-out KL
        assert rep["temperature"] == cal["temperature_per_keep_tokens"][k] and rep["heldout_kl_t1"] > 0
    models = mercury_from_any("reference:" + str(ref_json))
    fresh = build_mercury(MercuryConfig.from_checkpoint_json(ref_json, keep_tokens=models[-1].keep))
    assert any(not torch.equal(v, fresh.recon.state_dict()[n]) for n, v in models[-1].recon.state_dict().items())


def test_pyproject_ships_the_calibration():
    """A non-editable install gets the files only if package-data names them."""
    tomllib = pytest.importorskip("tomllib")     # Python >= 3.11
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mercury_onnx"]
    assert "data/reference/*.json" in globs and "data/reference/*.safetensors" in globs
    assert reference.META_JSON.parent == ROOT / "mercury_onnx" / "data" / "reference"


def test_demo_uses_the_shipped_calibration_and_prints_its_committed_top1(shipped, ref_json):
    from mercury_onnx import demo

    src = demo.shipped_calibration(demo.DemoOptions(), str(ref_json))
    assert src == f"reference:{ref_json}"
    assert demo.shipped_calibration(demo.DemoOptions(calib_steps=1), str(ref_json)) is None   # asked to calibrate
    assert demo.shipped_calibration(demo.DemoOptions(calibrate=False), str(ref_json)) is None
    meta = reference.info()
    meta["accuracy"] = {"dataset": "cifar10/test", "images": 10000, "results": [
        {"method": "vanilla", "keep_ratio": 1.0, "top1": 0.6046},
        {"method": "mercury", "keep_ratio": 0.5, "top1": 0.6005},
        {"method": "mercury", "keep_ratio": 0.25, "top1": 0.5854},
        {"method": "regional+duplicate", "keep_ratio": 0.25, "top1": 0.5758}]}
    reference.META_JSON.write_text(json.dumps(meta))
    assert demo.committed_top1(src, [0.5, 0.25]) == {demo.VANILLA: 0.6046, "mercury r=0.5": 0.6005,
                                                     "mercury r=0.25": 0.5854}
    assert demo.committed_top1(str(ref_json), [0.5]) == {}
    assert "mercury keep 0.25 58.54%" in reference.accuracy_line()
