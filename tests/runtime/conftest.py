"""Runtime fixtures: the runtime tests run on the exporter's reference export folder."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def export_dir(ref_export):
    return ref_export
