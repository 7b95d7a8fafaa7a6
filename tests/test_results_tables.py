"""docs/results: every table is generated from the JSON beside it (benchmarks/tables.py), and no
figure in README.md or docs/ cites a path outside the repository or ../shared."""
from __future__ import annotations

import importlib.util
import re

import pytest

from .conftest import ROOT

RESULTS = ROOT / "docs" / "results"
spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)

MARKDOWN = sorted(RESULTS.glob("*.md"))
GENERATED = tables.documents()          # docs/results/*.md and docs/RESULTS.md: tables only from JSON
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("md", GENERATED, ids=lambda p: p.name)
def test_every_table_is_generated_from_its_json(md):
    text = md.read_text()
    blocks = list(tables.BLOCK.finditer(text))
    inside = [(m.start("body"), m.end("body")) for m in blocks]
    pos = 0
    for line in text.splitlines(keepends=True):
        if line.startswith("|"):
            assert any(a <= pos < b for a, b in inside), f"{md.name}: table line outside a generated block: {line!r}"
        pos += len(line)
    for m in blocks:
        assert sorted(RESULTS.glob(m["json"])), f"{md.name}: {m['json']} missing"     # a name, or a `*` pattern
        assert m["body"] == tables.render_block(m["json"], m["spec"]), (
            f"{md.name}: the table from {m['json']} is stale; run python benchmarks/tables.py")


def test_every_results_file_has_a_table():
    assert MARKDOWN, "docs/results has no Markdown"
    for md in MARKDOWN:
        assert tables.BLOCK.search(md.read_text()), f"{md.name} has no generated table"


def test_the_checker_catches_a_hand_edit(tmp_path):
    md = next(p for p in MARKDOWN if tables.BLOCK.search(p.read_text()))
    text = md.read_text()
    m = tables.BLOCK.search(text)
    edited = text[:m.start("body")] + m["body"].replace("|", "| 1", 1) + text[m.end("body"):]
    assert tables.regenerate(edited) == text


OUTSIDE = re.compile(r"(?<![\w.])/(?:work|tmp|home|root|mnt|var|scratch)/|\.cache/mercury-onnx/(?:results|exp)")


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_figure_cites_a_path_outside_the_repo(md):
    bad = [f"{n}: {line.strip()}" for n, line in enumerate(md.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, f"{md.relative_to(ROOT)} cites paths outside the repository and ../shared:\n" + "\n".join(bad)
