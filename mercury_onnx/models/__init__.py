"""The Mercury method over timm ViTs: config, pruning, reconstruction, the split model.

Names are exported lazily, so `import mercury_onnx.models.config` does not pull torch.
"""
from __future__ import annotations

_EXPORTS = {"ConfigError": "config", "MercuryConfig": "config", "Mercury": "mercury",
            "build_mercury": "mercury"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
