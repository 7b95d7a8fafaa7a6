"""CLI smoke on tiny sizes: train, calibrate, eval (torch and ONNX), and the bad-input errors."""
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from mercury_onnx.calib.data import load_image_set
from mercury_onnx.calib.train import TrainSettings, augment, train
from mercury_onnx.cli import app
from mercury_onnx.models import MercuryConfig
from mercury_onnx.models.checkpoint import load_mercury

from ..conftest import CIFAR_TRAIN

runner = CliRunner()
TINY_VIT = dict(timm_model="deit_tiny_patch16_224",
                overrides={"img_size": 32, "patch_size": 4, "num_classes": 3, "depth": 2})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, cifar_test):
    root = tmp_path_factory.mktemp("tiny") / "data"
    for c in ("airplane", "cat", "ship"):
        (root / c).mkdir(parents=True)
        for f in sorted((cifar_test / c).iterdir())[:12]:
            shutil.copy(f, root / c / f.name)
    return root


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res, res.output + (res.stderr if res.stderr_bytes is not None else "")


def test_augment_keeps_shape_and_content():
    raw = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    out = augment(raw, 4, torch.Generator().manual_seed(0))
    assert out.shape == raw.shape and out.dtype == torch.uint8
    assert not torch.equal(out, raw)
    flipped = augment(raw, 0, torch.Generator().manual_seed(1))       # no padding: flips only
    assert torch.equal(flipped.float().sum((1, 2, 3)), raw.float().sum((1, 2, 3)))


def test_few_train_steps_reduce_the_loss(tiny_dir, tmp_path):
    cfg = MercuryConfig(**TINY_VIT)
    meta = train(cfg, tiny_dir, tmp_path / "m", TrainSettings(steps=12, batch_size=12, lr=2e-3, warmup=0.0,
                                                              label_smoothing=0.0, pad=0, bf16=False),
                 eval_dir=tiny_dir, progress=False)
    # the same 36 images it trained on: loss recorded at step 1 vs the last step
    assert meta["last_loss"] < meta["first_loss"]
    assert meta["steps"] == 12 and meta["test_images"] == 36 and meta["test_top1"] > 1 / 3
    saved = json.loads((tmp_path / "m.json").read_text())
    for key in ("timm_model", "overrides", "classes", "mean", "std", "epochs_seen", "steps",
                "batch_size", "test_top1", "train_minutes", "device"):
        assert key in saved


def test_train_cli_and_resume(tiny_dir, tmp_path):
    out = tmp_path / "vit"
    args = ["train", tiny_dir, "--model", "deit_tiny_patch16_224", "--img-size", 32, "--patch-size", 4,
            "--batch-size", 8, "--out", out, "--no-bf16"]
    res, text = _run(*args, "--steps", 2)
    assert res.exit_code == 0, text
    assert json.loads(out.with_suffix(".json").read_text())["overrides"]["num_classes"] == 3
    res, text = _run(*args, "--steps", 4, "--resume")
    assert res.exit_code == 0, text
    assert "resumed at step 2" in text and json.loads(out.with_suffix(".json").read_text())["steps"] == 4
    # the saved backbone JSON is usable as a model source
    cfg = MercuryConfig.from_checkpoint_json(out.with_suffix(".json"))
    assert cfg.checkpoint.endswith("vit.safetensors") and cfg.classes == ["airplane", "cat", "ship"]


@pytest.fixture(scope="module")
def calibrated(ref_json, tmp_path_factory):
    if not CIFAR_TRAIN.exists():
        pytest.skip("CIFAR-10 train split missing")
    out = tmp_path_factory.mktemp("calib") / "ref_cal"
    res, text = _run("calibrate", ref_json, CIFAR_TRAIN, "--keep-ratio", 0.5, "--keep-ratio", 0.25,
                     "--out", out, "--images", 48, "--heldout", 24, "--steps", 2, "--batch-size", 16,
                     "--temperature", 1, "--temperature", 2)
    assert res.exit_code == 0, text
    assert "held-out top-1" in text
    return out, text


def test_calibrate_sets_the_score_proxy_width(ref_json, tmp_path):
    if not CIFAR_TRAIN.exists():
        pytest.skip("CIFAR-10 train split missing")
    out = tmp_path / "attn16"
    res, text = _run("calibrate", ref_json, CIFAR_TRAIN, "-r", 0.25, "--out", out, "--images", 32, "--heldout", 0,
                     "--steps", 1, "--batch-size", 16, "--prune-point", "attn", "--score-proxy-width", 16)
    assert res.exit_code == 0, text
    assert "score proxy: gelu, width 16" in text
    m = load_mercury(out)[0]
    assert m.cfg.score_proxy_rank == 16 and m.score_proxy.a.shape == (m.dim, 16) and bool(m.score_proxy.fitted)


def test_calibrate_cli_writes_a_mercury_checkpoint(calibrated):
    out, _ = calibrated
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["format"] == "mercury-checkpoint/1" and info["keep_tokens"] == [32, 16]
    cal = info["calibration"]
    assert cal["images"] == 48 and cal["heldout_images"] == 24 and cal["steps"] == 2
    for k in ("32", "16"):
        rep = cal["per_keep_tokens"][k]
        assert {"heldout_before", "heldout_after", "train_loss_first", "minutes"} <= set(rep)
    models = load_mercury(out)
    assert [m.keep for m in models] == [32, 16]


def test_per_ratio_temperatures_land_in_one_checkpoint(calibrated):
    out, text = calibrated
    cal = json.loads(out.with_suffix(".json").read_text())["calibration"]
    assert cal["temperature_per_keep_tokens"] == {"32": 1.0, "16": 2.0}
    assert "temperature" not in cal          # no single temperature describes this run
    for k, t in (("32", 1.0), ("16", 2.0)):
        rep = cal["per_keep_tokens"][k]
        assert rep["temperature"] == t and rep["temperature_choice"]["chosen"] == t
        assert rep["heldout_kl_t1"] >= 0     # held-out KL at T=1, comparable across ratios' temperatures
    assert "K=32 (keep 0.5), T=1" in text and "K=16 (keep 0.25), T=2" in text


def test_eval_cli_json_schema_and_plot(calibrated, cifar_test, tmp_path):
    out, _ = calibrated
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    res, text = _run("eval", cifar_test, "--checkpoint", out, "--keep-ratio", 0.5, "--keep-ratio", 0.25,
                     "--images", 40, "--methods", "main", "--json", js, "--plot", png)
    assert res.exit_code == 0, text
    data = json.loads(js.read_text())
    assert set(data) == {"dataset", "images", "prune_point", "results", "checkpoint", "calibration"}
    assert data["images"] == 40 and data["prune_point"] == "block"
    assert data["calibration"]["steps"] == 2          # which calibration the Mercury rows used
    assert data["dataset"].endswith("test")
    for row in data["results"]:
        assert set(row) == {"method", "pruning", "reconstruction", "keep_ratio", "top1"}
    assert [(r["method"], r["keep_ratio"]) for r in data["results"]] == [("vanilla", 1.0), ("mercury", 0.5),
                                                                         ("mercury", 0.25)]
    assert png.stat().st_size > 1000 and "mercury" in text


def test_eval_cli_all_methods(calibrated, cifar_test, tmp_path):
    out, _ = calibrated
    js = tmp_path / "all.json"
    res, text = _run("eval", cifar_test, "--checkpoint", out, "--keep-ratio", 0.25, "--images", 24,
                     "--calib-images", 32, "--calib-steps", 1, "--json", js)
    assert res.exit_code == 0, text
    names = {r["method"] for r in json.loads(js.read_text())["results"]}
    assert {"vanilla", "mercury", "evit", "janus+meta-local", "regional+generator", "regional+meta-ctx",
            "score=product", "score=attention"} <= names


def test_eval_onnx_matches_torch(ref_export, ref_json, cifar_test, tmp_path):
    from mercury_onnx.calib.data import preprocess_for
    from mercury_onnx.models.checkpoint import mercury_from_any

    js = tmp_path / "onnx.json"
    res, text = _run("eval", cifar_test, "--checkpoint", ref_json, "--onnx", ref_export,
                     "--keep-ratio", 0.25, "--images", 32, "--json", js)
    assert res.exit_code == 0, text
    rows = {(r["method"], r.get("token_dtype")): r["top1"] for r in json.loads(js.read_text())["results"]}
    # the export has int8-token heads too: their own row, through the same tail
    assert set(rows) == {("vanilla", None), ("mercury", None), ("mercury", "int8")}
    assert "mercury (int8 tokens)" in text
    assert abs(rows[("mercury", "int8")] - rows[("mercury", None)]) <= 2 / 32
    rows = {m: t for (m, dt), t in rows.items() if dt is None}
    # the same graphs in torch: the export holds the reference model with uncalibrated meta
    (m,) = mercury_from_any(str(ref_json), keep_ratios=[0.25])
    ds, _ = load_image_set(cifar_test, preprocess_for(m), m.cfg.classes, count=32, progress=False)
    x, y = next(ds.batches(32))
    with torch.inference_mode():
        assert rows["vanilla"] == (m.backbone(x).argmax(-1) == y).float().mean().item()
        assert abs(rows["mercury"] - (m(x).argmax(-1) == y).float().mean().item()) <= 1 / 32


@pytest.mark.parametrize("args,msg", [
    (["eval", "/nonexistent/data", "--checkpoint", "REF"], "image folder not found"),
    (["eval", "TINY", "--checkpoint", "REF"], "do not match the model's classes"),
    (["calibrate", "REF", "/nonexistent/data", "--out", "/tmp/x"], "image folder not found"),
    (["calibrate", "REF", "TRAIN", "--out", "/tmp/x", "--keep-ratio", 0.1], "smaller than the 16 subregions"),
    (["calibrate", "REF", "TRAIN", "--out", "/tmp/x", "--reconstruction", "zero"], "nothing to learn"),
    (["calibrate", "REF", "TRAIN", "--out", "/tmp/x", "-r", 0.5, "-r", 0.25, "--temperature", 1,
      "--temperature", 2, "--temperature", 3], "once per -r"),
    (["calibrate", "REF", "TRAIN", "--out", "/tmp/x", "--heldout", 0, "--choose-temperature", 1], "--heldout > 0"),
    (["calibrate", "REF", "TRAIN", "--out", "/tmp/x", "--prune-point", "attn", "--score-proxy-width", 0],
     "--score-proxy-width must be >= 1"),
    (["eval", "TINY", "--checkpoint", "/nonexistent/ck.json"], "cannot read checkpoint JSON"),
    (["eval", "TINY", "--checkpoint", "REF", "--methods", "regional+duplicate,nope"], "unknown method(s) ['nope']"),
])
def test_bad_input_gives_a_clear_error(args, msg, ref_json, tiny_dir):
    args = [{"REF": ref_json, "TINY": tiny_dir, "TRAIN": CIFAR_TRAIN}.get(a, a) for a in args]
    res, text = _run(*args)
    assert res.exit_code == 2 and "error:" in text and msg in text, text
    assert "Traceback" not in text
