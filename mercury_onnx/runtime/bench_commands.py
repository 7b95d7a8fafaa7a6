"""CLI commands of this area, registered on the main typer app by mercury_onnx/cli.py.

Keep module-level imports light (no torch/timm/onnx): import inside each command.
"""
from __future__ import annotations


def register(app) -> None:
    pass
