"""Runtime fixtures: the runtime tests run on the exporter's reference export folder; the `ray`
tests share one local Ray cluster on loopback (2 logical CPUs) with Serve on a free port."""
from __future__ import annotations

import os

import pytest

from mercury_onnx.runtime.ray_config import LOOPBACK_ENV, SERVE_ENV

os.environ.setdefault(LOOPBACK_ENV, "0")   # before anything imports Ray: the test cluster stays on loopback
os.environ.update(SERVE_ENV)               # and runs with serve-tail --engine ray's Serve settings


@pytest.fixture(scope="session")
def export_dir(ref_export):
    return ref_export


@pytest.fixture(scope="session")
def codec_export(ref_json, cifar_test, tmp_path_factory):
    """The reference model exported as ref_export is (keep 0.5 and 0.25, int8 tokens), plus a
    16x4 codec (PCA on real CIFAR-10 train images, zstd dictionary) and an e4 entropy codec per
    keep ratio: export --codec."""
    from mercury_onnx.export import export_model

    from ..conftest import CIFAR_TRAIN

    if not CIFAR_TRAIN.exists():
        pytest.skip(f"CIFAR-10 train images not found at {CIFAR_TRAIN}")
    return export_model(ref_json, tmp_path_factory.mktemp("codec_export") / "export", [0.5, 0.25],
                        token_dtypes=["int8"], codecs=["16x4", "e4"], calib_data=CIFAR_TRAIN, codec_images=512,
                        validate_data=cifar_test, validate_images=32, log=None)


@pytest.fixture(scope="session")
def ray_cluster():
    """(GCS address, Serve HTTP port) of a local Ray cluster started by this test session; each
    `serve-tail --engine ray --address GCS` deploys into it, and it stops with the session."""
    ray = pytest.importorskip("ray", reason="Ray Serve not installed: pip install -e '.[scale]'")
    from ray import serve

    from mercury_onnx.runtime.server import free_port

    from mercury_onnx.runtime.ray_config import SYSTEM_CONFIG

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _system_config=SYSTEM_CONFIG)
    port = free_port()
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        yield ray.get_runtime_context().gcs_address, port
    finally:
        serve.shutdown()
        ray.shutdown()


def spawn_ray(export_dir, ray_cluster, *args, log=None):
    """serve-tail --engine ray into the session's cluster: (process, url). Ray starts slowly on a
    loaded 2-core machine (20-60 s): the ready wait is generous but bounded."""
    from mercury_onnx.runtime.server import spawn

    address, port = ray_cluster
    return spawn(export_dir, "--engine", "ray", "--address", address, *args, port=port,
                 ready_timeout=300, log=log)
