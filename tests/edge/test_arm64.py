"""The heads under the real aarch64 onnxruntime (Raspberry Pi 4 CPU, QEMU user mode) agree with
x86 onnxruntime on real images, and the check catches a head that does not.

tools/arm64_check.sh does the work (cached arm64 root, see its header); it exits 77 where the
machine cannot build the root (not root, no Debian mirror): skipped here, unless
MERCURY_REQUIRE_ARM64=1 (set by .ci/run), where that is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mercury_onnx.formats.manifest import sha256_file

pytestmark = pytest.mark.arm64

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "tools" / "arm64_check.sh"
RUN_HEADS = ROOT / "tools" / "arm64_run_heads.py"
SKIP = 77
IMAGES = "16"  # real CIFAR-10 test images per check: the emulated fp32 head is the slow part


def sh(*args, timeout=1800, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def skip_unless_required(r: subprocess.CompletedProcess) -> None:
    if r.returncode == SKIP:
        why = (r.stderr.strip().splitlines() or ["exit 77"])[-1]
        if os.environ.get("MERCURY_REQUIRE_ARM64") == "1":
            pytest.fail(f"MERCURY_REQUIRE_ARM64 is set but the arm64 check cannot run: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def arm64_root():
    r = sh("bash", CHECK, "--build-root")
    skip_unless_required(r)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def export(request) -> Path:
    """MERCURY_ARM64_EXPORT=DIR checks that export folder; by default the session's reference
    export with an int8 head made by the exporter's quantize_head (tests/edge/conftest.py)."""
    given = os.environ.get("MERCURY_ARM64_EXPORT")
    return Path(given) if given else request.getfixturevalue("int8_export")


def head_graphs(export_dir: Path) -> set[tuple[str, str]]:
    """{("k16", "head_int8"), ...}: every head graph the export has."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    return ({(f"k{v['keep_tokens']}", k) for v in manifest["variants"]
             for k in ("head", "head_int8", "head_tok8", "head_tok16") if v.get(k)}
            | {(f"k{v['keep_tokens']}", f"codec_{c['name']}") for v in manifest["variants"] for c in v.get("codecs") or []})


def test_export_heads_agree_on_arm64(arm64_root, export, cifar_test):
    r = sh("bash", CHECK, export, cifar_test, MERCURY_ARM64_IMAGES=IMAGES)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "aarch64: onnxruntime" in r.stdout and "(QEMU cortex-a72)" in r.stdout
    graphs = head_graphs(export)
    assert f"PASS: {len(graphs)} head graph(s) agree" in r.stdout
    table = [line.split() for line in r.stdout.splitlines() if line.startswith("k")]
    assert table and all(row[-1] == "PASS" for row in table)
    assert {(row[0], row[1]) for row in table} == graphs
    # int8 heads are held to equal indices as well (the default gate, not only reported)
    assert all(row[-2] == "equal" for row in table if row[2] == "indices")
    if not os.environ.get("MERCURY_ARM64_EXPORT"):
        assert any(kind == "head_int8" for _, kind in graphs), "the int8 head (the ARM graph) went unchecked"


def one_head_export(src: Path, dst: Path, perturb: bool) -> Path:
    """A copy of src holding only its first fp32 head; with perturb, the head's largest
    weight is scaled by 1.001 (a change far below what the eye sees, far above 1e-4 in the tokens)."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((src / "manifest.json").read_text())
    v = dict(manifest["variants"][0], head_int8=None, head_tok8=None, head_tok16=None)
    file = v["head"]["file"]
    dst.mkdir(parents=True)
    if perturb:
        model = onnx.load(src / file)
        w = max(model.graph.initializer, key=lambda t: np.prod(t.dims) if t.data_type == onnx.TensorProto.FLOAT else 0)
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.001), w.name))
        onnx.save(model, dst / file)
    else:
        shutil.copy(src / file, dst / file)
    manifest.update(variants=[v], files={file: sha256_file(dst / file)}, full=None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_check_fails_when_arm64_head_differs(arm64_root, export, cifar_test, tmp_path):
    # x86 runs the exported head; the emulated Pi runs the same head with one weight nudged by 0.1%.
    orig = one_head_export(export, tmp_path / "orig", perturb=False)
    bent = one_head_export(export, tmp_path / "perturbed", perturb=True)
    work = tmp_path / "work"
    work.mkdir()
    py = sys.executable
    for args in (["batch", orig, cifar_test, work / "batch.npy", "--n", "4"],
                 ["run", orig, work / "batch.npy", work / "x86_64.npz"]):
        r = sh(py, RUN_HEADS, *args)
        assert r.returncode == 0, r.stderr[-3000:]
    r = sh("bash", CHECK, "--run-arm", bent, work, "--", "run", "/mnt/export", "/mnt/work/batch.npy",
           "/mnt/work/aarch64.npz")
    skip_unless_required(r)
    assert r.returncode == 0, r.stderr[-3000:]
    r = sh(py, RUN_HEADS, "compare", work / "x86_64.npz", work / "aarch64.npz", orig)
    print(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    tokens_row = next(line.split() for line in r.stdout.splitlines() if line.split()[1:3] == ["head", "tokens"])
    assert tokens_row[-1] == "FAIL" and float(tokens_row[4]) > 1e-4
    assert "FAIL:" in r.stdout and "PASS:" not in r.stdout


@pytest.fixture(scope="module")
def codec_export(ref_json, cifar_test, tmp_path_factory) -> Path:
    """The reference model exported with a 16x4 and an e4 codec (export --codec), fit on real train images."""
    from mercury_onnx.export import export_model

    from ..conftest import CIFAR_TRAIN

    return export_model(ref_json, tmp_path_factory.mktemp("arm64_codec") / "export", [0.25], codecs=["16x4", "e4"],
                        calib_data=CIFAR_TRAIN, codec_images=512, validate_data=cifar_test, validate_images=16,
                        log=None)


def test_codec_heads_agree_on_arm64(arm64_root, codec_export, cifar_test):
    """Issue 13: a codec head's codes equal between aarch64 and x86_64 within one step."""
    r = sh("bash", CHECK, codec_export, cifar_test, MERCURY_ARM64_IMAGES=IMAGES)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line.split() for line in r.stdout.splitlines() if line.startswith("k")]
    for name in ("codec_16x4", "codec_e4"):
        codes = [row for row in table if row[1] == name and row[2] == "codes"]
        assert codes and codes[0][-1] == "PASS" and "<=" in codes[0], (name, codes)
    assert {(row[0], row[1]) for row in table} == head_graphs(codec_export)



@pytest.fixture(scope="module")
def attn_export(ref_json, cifar_test, tmp_path_factory) -> Path:
    """Issue 14: the reference model at prune point attn, its score proxy fit on 256 real train
    images (as calibrate fits it), exported with fp32, int8 (QDQ) and int8-token heads."""
    from mercury_onnx.calib.calibrate import run_prefix
    from mercury_onnx.calib.data import load_image_set, preprocess_for
    from mercury_onnx.export import export_model
    from mercury_onnx.models.checkpoint import mercury_from_any, save_mercury

    from ..conftest import CIFAR_TRAIN

    tmp = tmp_path_factory.mktemp("arm64_attn")
    models = mercury_from_any(str(ref_json), keep_ratios=[0.25], prune_point="attn")
    train, _ = load_image_set(CIFAR_TRAIN, preprocess_for(models[0]), models[0].cfg.classes, count=256,
                              progress=False)
    assert models[0].fit_score_proxy(run_prefix(models[0], train, progress=False).x) is not None
    save_mercury(tmp / "attn", models)
    return export_model(tmp / "attn.json", tmp / "export", [0.25], int8_head=True, token_dtypes=["int8"],
                        calib_images=32, int8_select_images=32, validate_data=cifar_test, validate_images=16,
                        log=None)


def test_attn_heads_agree_on_arm64(arm64_root, attn_export, cifar_test):
    """Issue 14: the fp32, int8 and int8-token heads of prune point attn (score proxy fitted)
    select equal indices on aarch64 and x86_64."""
    assert json.loads((attn_export / "manifest.json").read_text())["score_proxy"] == {"rank": 64, "kind": "gelu", "fitted": True}
    r = sh("bash", CHECK, attn_export, cifar_test, MERCURY_ARM64_IMAGES=IMAGES)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line.split() for line in r.stdout.splitlines() if line.startswith("k")]
    assert {row[1] for row in table} == {"head", "head_int8", "head_tok8"}
    assert all(row[-2] == "equal" and row[-1] == "PASS" for row in table if row[2] == "indices")
