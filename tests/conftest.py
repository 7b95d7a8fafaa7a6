"""Shared fixtures. Real data lives in ../shared beside the checkout (CI has it too)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REF_JSON = SHARED / "models" / "deit_tiny_patch4_32_cifar10.json"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test"
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train"
TRACES = SHARED / "data" / "traces"


def pytest_collection_modifyitems(config, items):
    """`ray` tests skip, with the reason, where Ray Serve is not installed (the [scale] extra)."""
    if importlib.util.find_spec("ray") is None:
        skip = pytest.mark.skip(reason="Ray Serve not installed: pip install -e '.[scale]'")
        for item in items:
            if item.get_closest_marker("ray"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ref_json() -> Path:
    if not REF_JSON.exists():
        pytest.skip(f"reference checkpoint not found at {REF_JSON}")
    return REF_JSON


@pytest.fixture(scope="session")
def cifar_test() -> Path:
    if not CIFAR_TEST.exists():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_TEST}")
    return CIFAR_TEST


# ---- export (issue 4): one export folder of the reference model per test session ----
@pytest.fixture(scope="session")
def ref_export(ref_json, cifar_test, tmp_path_factory) -> Path:
    """Export folder (docs/FORMAT.md) of the reference model (uncalibrated meta-parameters):
    keep ratios 0.5 (K=32) and 0.25 (K=16), fp32 + tok8 heads, fp32 tails, full.onnx."""
    from mercury_onnx.export import export_model

    return export_model(ref_json, tmp_path_factory.mktemp("ref_export") / "export", [0.5, 0.25],
                        token_dtypes=["int8"], validate_data=cifar_test, validate_images=32, log=None)
