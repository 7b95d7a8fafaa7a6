"""Keys for runtime caches (the demo's calibration/export, decoded images).

A cached result is only as good as the code that made it, so every key covers the package
version and the content of the package's source and data files (mercury_onnx/**/*.py and
mercury_onnx/data/**), as well as the inputs: after an upgrade, or any edit of a checkout, the
old entries are simply not found again (they stay on disk until the cache folder is removed).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


_hashes: dict[tuple, str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) for this process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mercury-onnx")
    except PackageNotFoundError:        # a checkout on PYTHONPATH, not installed
        return "uninstalled"


@lru_cache(maxsize=None)
def source_digest(root: Path = PACKAGE) -> str:
    """sha256 over the relative path and bytes of every source and data file under root."""
    h = hashlib.sha256()
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and (p.suffix == ".py" or "data" in p.relative_to(root).parts)]
    for p in sorted(files):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def cache_key(*parts, root: Path = PACKAGE) -> str:
    """12 hex digits from the package version, its source, and `parts`: a file is hashed by
    content, a folder by its path, size and mtime, anything else by repr."""
    h = hashlib.sha256(f"{package_version()}|{source_digest(root)}".encode())
    for p in parts:
        if isinstance(p, Path) and p.is_file():
            h.update(f"|file:{sha256_file(p)}".encode())
        elif isinstance(p, Path) and p.exists():
            st = p.stat()
            h.update(f"|dir:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(f"|{p!r}".encode())
    return h.hexdigest()[:12]
