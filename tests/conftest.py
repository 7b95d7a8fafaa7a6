"""Shared fixtures. Real data lives in ../shared beside the checkout (CI has it too)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REF_JSON = SHARED / "models" / "deit_tiny_patch4_32_cifar10.json"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test"
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train"
TRACES = SHARED / "data" / "traces"


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
