"""The calibration shipped for the reference backbone: it loads, it belongs to the backbone
whose sha256 it records, and any other backbone is refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mercury_onnx.cli import app
from mercury_onnx.models import ConfigError, MercuryConfig, build_mercury
from mercury_onnx.models import reference
from mercury_onnx.models.checkpoint import is_mercury_checkpoint, mercury_from_any, read_checkpoint_json

from ..conftest import ROOT


def test_shipped_calibration_matches_its_recorded_backbone_hash(ref_json):
    meta = reference.info()
    weights = reference.backbone_weights(ref_json)
    assert meta["backbone"]["file"] == weights.name
    assert reference.sha256_file(weights) == meta["backbone"]["sha256"]
    # one report per shipped keep count, with the temperature used and its held-out KL
    cal = meta["calibration"]
    assert sorted(cal["per_keep_tokens"], key=int) == sorted(map(str, meta["keep_tokens"]), key=int)
    for k, rep in cal["per_keep_tokens"].items():
        assert rep["temperature"] == cal["temperature_per_keep_tokens"][k]
        assert rep["heldout_kl_t1"] > 0


def test_shipped_calibration_loads_its_meta_parameters(ref_json):
    shipped = load_file(str(reference.META_WEIGHTS))
    models = mercury_from_any(f"reference:{ref_json}", keep_ratios=[0.5, 0.25])
    assert [m.keep for m in models] == [32, 16] and models[0].backbone is models[1].backbone
    for m in models:
        for name, v in m.recon.state_dict().items():
            assert torch.equal(v, shipped[f"meta.{m.keep}.{name}"]), name
    # learned, not the untrained start: the fill differs from a fresh wrapper's on a real shape
    fresh = build_mercury(MercuryConfig.from_checkpoint_json(ref_json, keep_tokens=16))
    assert any(not torch.equal(v, fresh.recon.state_dict()[n]) for n, v in models[1].recon.state_dict().items())
    # the backbone is the reference backbone, unchanged
    ref_sd = load_file(str(reference.backbone_weights(ref_json)))
    assert all(torch.equal(v, ref_sd[k]) for k, v in models[0].backbone.state_dict().items() if k in ref_sd)


def test_the_reference_backbone_json_selects_the_shipped_calibration(ref_json):
    assert reference.shipped_source(str(ref_json), [0.5, 0.25]) == f"reference:{ref_json}"
    assert reference.shipped_source(str(ref_json), [0.3]) == str(ref_json)     # not shipped: calibrate it
    assert is_mercury_checkpoint(f"reference:{ref_json}")
    assert read_checkpoint_json(f"reference:{ref_json}")["keep_tokens"] == reference.info()["keep_tokens"]


@pytest.fixture(scope="module")
def other_backbone(ref_json, tmp_path_factory):
    """The reference backbone JSON beside weights with one number changed."""
    d = tmp_path_factory.mktemp("other")
    shutil.copy(ref_json, d / "other.json")
    sd = load_file(str(reference.backbone_weights(ref_json)))
    sd["head.bias"] = sd["head.bias"].clone() + 1e-3
    save_file(sd, str(d / "other.safetensors"))
    return d / "other.json"


def test_a_different_backbone_is_refused(other_backbone):
    with pytest.raises(ConfigError, match="is not the reference backbone"):
        mercury_from_any(f"reference:{other_backbone}", keep_ratios=[0.5])
    assert reference.shipped_source(str(other_backbone), [0.5]) == str(other_backbone)   # never auto-selected
    r = CliRunner().invoke(app, ["info", "--model", f"reference:{other_backbone}"])
    assert r.exit_code == 2 and "is not the reference backbone" in r.output and "Traceback" not in r.output


def test_a_missing_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="reference backbone not found"):
        mercury_from_any(f"reference:{tmp_path / 'nope.json'}")


def test_pyproject_ships_the_calibration():
    """A non-editable install gets the files only if package-data names them."""
    tomllib = pytest.importorskip("tomllib")     # Python >= 3.11
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mercury_onnx"]
    pkg = ROOT / "mercury_onnx"
    shipped = {p for g in globs for p in pkg.glob(g)}
    assert {reference.META_JSON, reference.META_WEIGHTS} <= shipped
    assert json.loads(reference.META_JSON.read_text())["format"] == "mercury-checkpoint/1"
