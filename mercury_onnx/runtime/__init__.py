"""Device and cloud runtime over the exported ONNX graphs. No torch here: this is what a
Raspberry Pi installs with the [edge] extra.

    from mercury_onnx.runtime import Client          # device: head here, tail on a server
    preds = Client("export/", "http://server:8000").predict(["cat.jpg"])
    from mercury_onnx.runtime.server import create_app   # cloud: the serve-tail ASGI app

Names are imported lazily, so `import mercury_onnx.runtime.<module>` stays light.
"""
from __future__ import annotations

_EXPORTS = {"Client": "client", "Prediction": "client", "KServeClient": "client",
            "ServerError": "client", "RequestRejected": "client", "Head": "head", "FullModel": "head",
            "Tail": "tail", "ProviderError": "tail"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
