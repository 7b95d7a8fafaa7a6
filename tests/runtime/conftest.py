"""Runtime fixtures: the runtime tests run on the exporter's reference export folder."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def export_dir(ref_export):
    return ref_export


@pytest.fixture(scope="session")
def codec_export(ref_export, tmp_path_factory):
    """The reference export plus a 16x4 codec (with a zstd dictionary) per keep ratio, built by
    tests/runtime/codec_export.py from PCA on real CIFAR-10 train images."""
    from ..conftest import CIFAR_TRAIN
    from .codec_export import add_codec

    if not CIFAR_TRAIN.exists():
        pytest.skip(f"CIFAR-10 train images not found at {CIFAR_TRAIN}")
    return add_codec(ref_export, tmp_path_factory.mktemp("codec_export") / "export", CIFAR_TRAIN)
