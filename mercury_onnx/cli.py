"""mercury-onnx: the command line. Assembles: each area's commands module defines its commands
(module-level functions); this file registers them on the app from mercury_onnx/app.py.

Device-side commands (infer, bench on a Pi, profile) import no torch; commands that need the
`export` extra say so clearly when it is missing instead of dying in an ImportError.
"""
from __future__ import annotations

import sys

import typer

from . import demo
from .app import app
from .calib import commands as calib_commands
from .export import commands as export_commands
from .models import commands as models_commands
from .runtime import bench_commands, commands as runtime_commands

for name, command in (("info", models_commands.info),
                      ("train", calib_commands.train), ("calibrate", calib_commands.calibrate),
                      ("eval", calib_commands.evaluate),
                      ("export", export_commands.export),
                      ("serve-tail", runtime_commands.serve_tail), ("infer", runtime_commands.infer),
                      ("bench", bench_commands.bench), ("profile", bench_commands.profile),
                      ("demo", demo.demo)):
    app.command(name)(command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
