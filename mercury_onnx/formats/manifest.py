"""manifest.json of an export folder: what is in it, and checksums so nothing is swapped.

Torch-free on purpose: the device side (a Raspberry Pi with the [edge] extra) and the server
read it. The writer is `mercury_onnx.export` (see docs/FORMAT.md for the full schema).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "mercury-export/1"
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """The export folder is incomplete, tampered with, or not ours. The message says which."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(export_dir: str | Path, verify: bool = True) -> dict:
    """Read EXPORT_DIR/manifest.json; with verify, check every listed file's sha256."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not path.exists():
        raise ManifestError(f"{export_dir} has no {MANIFEST}: not an export folder "
                            "(make one with `mercury-onnx export`)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if verify:
        verify_files(export_dir, manifest)
    return manifest


def verify_files(export_dir: str | Path, manifest: dict) -> None:
    export_dir = Path(export_dir)
    for name, digest in manifest.get("files", {}).items():
        f = export_dir / name
        if not f.exists():
            raise ManifestError(f"{f} is listed in the manifest but missing")
        actual = sha256_file(f)
        if actual != digest:
            raise ManifestError(f"{f} does not match the manifest (sha256 {actual[:12]}… != "
                                f"{digest[:12]}…): the file was modified or belongs to another export")


def variant(manifest: dict, keep_ratio: float | None = None) -> dict:
    """The manifest entry for a keep ratio (closest match); None = the first one exported."""
    variants = manifest.get("variants", [])
    if not variants:
        raise ManifestError("the manifest lists no head/tail variants")
    if keep_ratio is None:
        return variants[0]
    best = min(variants, key=lambda v: abs(v["keep_ratio"] - keep_ratio))
    if abs(best["keep_ratio"] - keep_ratio) > 1e-3:
        have = [v["keep_ratio"] for v in variants]
        raise ManifestError(f"no export for keep ratio {keep_ratio}; this folder has {have}")
    return best


def write_manifest(export_dir: str | Path, manifest: dict, files: list[str]) -> Path:
    """Write EXPORT_DIR/manifest.json with the sha256 of every file in `files` (names
    relative to export_dir). The writer's half of load_manifest."""
    export_dir = Path(export_dir)
    manifest = {"format": FORMAT, **manifest,
                "files": {name: sha256_file(export_dir / name) for name in sorted(files)}}
    path = export_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return path
