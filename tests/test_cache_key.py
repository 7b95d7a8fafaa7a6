"""Runtime caches are keyed by the package version and the source's content, not only inputs."""
from __future__ import annotations

import shutil
from pathlib import Path

from mercury_onnx import cache_key as ck


def _copy_package(tmp_path: Path) -> Path:
    root = tmp_path / "mercury_onnx"
    shutil.copytree(ck.PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_key_changes_when_the_source_changes(tmp_path):
    root = _copy_package(tmp_path)
    before = ck.cache_key("same inputs", 0.5, root=root)
    assert ck.cache_key("same inputs", 0.5, root=root) == before       # stable for the same code
    demo = root / "demo.py"
    ck.source_digest.cache_clear()
    demo.write_text(demo.read_text() + "\n# a one-line change\n")
    assert ck.cache_key("same inputs", 0.5, root=root) != before
    ck.source_digest.cache_clear()


def test_the_key_changes_with_shipped_data_and_version(tmp_path, monkeypatch):
    root = _copy_package(tmp_path)
    before = ck.cache_key("x", root=root)
    monkeypatch.setattr(ck, "package_version", lambda: "9.9.9")
    assert ck.cache_key("x", root=root) != before
    monkeypatch.undo()
    ck.source_digest.cache_clear()
    (root / "data" / "reference").mkdir(parents=True, exist_ok=True)
    (root / "data" / "reference" / "reference.json").write_text('{"changed": true}')
    assert ck.cache_key("x", root=root) != before
    ck.source_digest.cache_clear()


def test_files_are_keyed_by_content(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a")
    k1 = ck.cache_key(f)
    f.write_bytes(b"bb")
    assert ck.cache_key(f) != k1 and ck.cache_key(tmp_path / "missing") != k1


def test_the_demo_and_image_caches_use_it(monkeypatch):
    from mercury_onnx.calib import data
    from mercury_onnx import demo

    assert demo._key("a", 1) == ck.cache_key("a", 1)
    paths = [Path("/d/c/1.jpg")]
    before = data._cache_file(Path("/d"), paths, (32, 32))
    monkeypatch.setattr(ck, "package_version", lambda: "9.9.9")
    assert data._cache_file(Path("/d"), paths, (32, 32)) != before
