"""ORT sessions from an export folder, image preprocessing, and the device side's imports."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from mercury_onnx.formats.manifest import ManifestError, load_manifest
from mercury_onnx.runtime.head import FullModel, Head
from mercury_onnx.formats.images import ImageError, preprocess
from mercury_onnx.runtime.tail import ProviderError, Tail


def test_device_side_imports_no_torch():
    code = ("import sys; import mercury_onnx.runtime.client, mercury_onnx.runtime.head, "
            "mercury_onnx.formats.images, mercury_onnx.runtime.codec, mercury_onnx.runtime.tail; "
            "bad = [m for m in ('torch', 'timm', 'onnx', 'fastapi') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_preprocess_matches_the_manifest_normalisation(export_dir, cifar_test):
    pre = load_manifest(export_dir)["preprocess"]
    path = sorted((cifar_test / "cat").glob("*.jpg"))[0]
    x = preprocess([path], pre)
    raw = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255       # (H, W, 3)
    expected = (raw - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    assert x.shape == (1, 3, *pre["size"]) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], expected.transpose(2, 0, 1), atol=1e-6)


def test_preprocess_resizes_and_rejects_non_images(tmp_path):
    pre = {"mean": [0.5] * 3, "std": [0.5] * 3, "size": [32, 32]}
    Image.new("RGB", (100, 60), (255, 0, 0)).save(tmp_path / "wide.png")
    x = preprocess([tmp_path / "wide.png"], pre)
    assert x.shape == (1, 3, 32, 32) and np.allclose(x[0, 0], 1) and np.allclose(x[0, 1:], -1)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="cannot read"):
        preprocess([tmp_path / "text.jpg"], pre)


def test_head_session_is_device_friendly(export_dir):
    head = Head(export_dir, 0.5, threads=1)
    opts = head.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    out = head(np.zeros((2, 3, 32, 32), np.float32))
    assert out["tokens"].shape == (2, 33, 192) and out["indices"].shape == (2, 32)
    assert (np.diff(out["indices"], axis=1) > 0).all()


def test_head_tail_and_full_agree_on_what_the_manifest_says(export_dir):
    tail = Tail(export_dir, 0.25, provider="cpu")
    assert tail.name == "mercury_tail_k16" and tail.keep == 16 and tail.num_classes == 10
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = Head(export_dir, 0.25)(x)
    assert tail(out["tokens"], out["indices"]).shape == (3, 10)
    assert FullModel(export_dir)(x).shape == (3, 10)
    with pytest.raises(ManifestError, match="no export for keep ratio"):
        Tail(export_dir, 0.9, provider="cpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_is_never_silently_cpu(export_dir):
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        Tail(export_dir, provider="cuda")
    assert Tail(export_dir, provider="auto").provider == "cpu"


def test_tampered_export_is_refused(export_dir, tmp_path):
    import shutil
    bad = tmp_path / "export"
    shutil.copytree(export_dir, bad)
    m = json.loads((bad / "manifest.json").read_text())
    tail_file = m["variants"][0]["tail"]["file"]
    with open(bad / tail_file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        Tail(bad, provider="cpu")
