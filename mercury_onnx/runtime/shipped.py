"""The committed test accuracy of the calibration shipped for the reference model, device side.

An export made from that calibration (`mercury-onnx export reference ...`, or from the
reference backbone JSON) records it in its manifest (`source` reference:..., and the same
`calibration` report). `bench` then reports those 10,000-image top-1 figures
(docs/results/accuracy.json, copied into the shipped JSON) when no --eval-json is given.
Reads the shipped JSON directly: no torch, nothing from models/.
"""
from __future__ import annotations

import json
from pathlib import Path

SHIPPED_JSON = Path(__file__).resolve().parents[1] / "data" / "reference" / "reference.json"


def shipped_accuracy(manifest: dict) -> tuple[list[dict], dict] | None:
    """(eval rows, accuracy source) when the export holds the shipped calibration, else None."""
    if not str(manifest.get("source", "")).startswith("reference") or not SHIPPED_JSON.exists():
        return None
    shipped = json.loads(SHIPPED_JSON.read_text())
    acc = shipped.get("accuracy")
    if not acc or manifest.get("calibration") != shipped.get("calibration"):
        return None     # an export of an older shipped calibration: its figures are not these
    return list(acc["results"]), {"file": f"shipped calibration ({acc.get('file', 'docs/results/accuracy.json')})",
                                  "dataset": acc.get("dataset"), "images": acc.get("images")}
