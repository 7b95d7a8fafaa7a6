"""The Mercury method over timm ViTs: config, pruning, reconstruction, the split model."""
from .config import ConfigError, MercuryConfig
from .mercury import Mercury, build_mercury

__all__ = ["ConfigError", "MercuryConfig", "Mercury", "build_mercury"]
