"""The typer app every command registers on, and the helpers commands share.

A leaf: it imports nothing from the package, so command modules import it without pulling
cli.py (which imports them) and `python -m mercury_onnx.cli` loads cli.py once.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Mercury split inference for timm ViTs: calibrate, export, serve, bench.")


@app.callback()
def _root() -> None:
    """Mercury split inference for timm ViTs: calibrate, export, serve, bench."""


def fail(msg: str, code: int = 2) -> None:
    """Print `error: msg` in red on stderr and exit with `code` (no traceback)."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def need_export_extra(command: str) -> None:
    """Fail with the pip line to run when torch, timm or onnx is missing."""
    missing = [m for m in ("torch", "timm", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"`mercury-onnx {command}` needs {', '.join(missing)}: install the export extra, "
             "pip install 'mercury-onnx[export]' (the [edge] extra is device-side only)")


def shown_path(p: str | Path) -> str:
    """A path as results JSON record it: relative to the working folder when inside it or in
    ../shared, else its name only, so a JSON under docs/results names no folder of the machine
    that made it ('reference' stays 'reference')."""
    rel = os.path.relpath(p)
    return rel if rel.startswith("../shared/") or not rel.startswith("..") else Path(p).name
