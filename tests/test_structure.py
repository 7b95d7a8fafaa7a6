"""The package's import graph, read statically from the source (AST, every import including
those inside functions): no cycles, and the device side (runtime/) reaches nothing upstream.

Static on purpose: a try-import passes whenever torch happens to be installed, and a lazy
import inside a function never runs at import time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mercury_onnx"
UPSTREAM = ("mercury_onnx.models", "mercury_onnx.calib", "mercury_onnx.export", "mercury_onnx.cli",
            "mercury_onnx.demo")


def module_name(path: Path, root: Path = PKG) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = PKG) -> set[str]:
    """Package modules that `path` imports, anywhere in the file. `from .x import y` counts
    as an edge to x.y when that is a module, else to x."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:          # `import pkg.mod.attr` -> the module
                t = t.rpartition(".")[0]
            if t and t != me:
                out.add(t)
    return out


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, modules, root) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. Edges to a package's __init__ count (they run it)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def upstream_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, n) for m, deps in graph.items() if m.startswith("mercury_onnx.runtime")
                  for n in deps if n.startswith(UPSTREAM))


def test_the_package_import_graph_has_no_cycles():
    graph = import_graph()
    assert "mercury_onnx.runtime.client" in graph and graph["mercury_onnx.cli"], "the graph was not read"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_nothing_imports_cli():
    """So `python -m mercury_onnx.cli` (serve-tail's and the demo's subprocesses) runs cli.py
    once, as __main__, and never a second copy as mercury_onnx.cli."""
    graph = import_graph()
    assert sorted(m for m, deps in graph.items() if "mercury_onnx.cli" in deps) == []


def test_runtime_imports_nothing_from_models_calib_export_cli_demo():
    graph = import_graph()
    assert "mercury_onnx.formats.manifest" in graph["mercury_onnx.runtime.client"]   # a real edge is seen
    assert upstream_edges(graph) == []


def _seed(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the package with some files replaced (a seeded bug)."""
    import shutil
    root = tmp_path / "mercury_onnx"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, text in files.items():
        (root / rel).write_text((root / rel).read_text() + text)
    return root


@pytest.mark.parametrize("line", ["\nfrom ..cli import main\n",                        # relative, top level
                                  "\ndef f():\n    from ..export.pipeline import export_model\n",   # inside a function
                                  "\nimport mercury_onnx.models.config\n",             # absolute
                                  "\nfrom .. import demo\n"])                          # a module via `from pkg import`
def test_a_seeded_upstream_import_in_runtime_is_found(tmp_path, line):
    root = _seed(tmp_path, {"runtime/network.py": line})
    assert upstream_edges(import_graph(root)), line


def test_a_seeded_cli_import_is_found(tmp_path):
    root = _seed(tmp_path, {"export/commands.py": "\ndef f():\n    from ..cli import app\n"})
    assert "mercury_onnx.cli" in import_graph(root)["mercury_onnx.export.commands"]


def test_a_seeded_cycle_is_found(tmp_path):
    root = _seed(tmp_path, {"app.py": "\ndef f():\n    from . import cli\n"})    # cli -> app -> cli
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and "mercury_onnx.cli" in cycle and "mercury_onnx.app" in cycle
