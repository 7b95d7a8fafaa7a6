"""Build the timm backbone a MercuryConfig names, with its weights.

Three ways to get weights, as a user would expect from timm:
- `checkpoint`: a local .safetensors / .pth(.tar) state dict (the reference checkpoint in
  ../shared/models/ is one);
- `pretrained=True`: timm's hub download (needs network; fails with a clear message here);
- neither: timm's random init (for latency work; say so in results). Its biases are all zero,
  and the ONNX exporter drops an add of zeros, so its graph lacks the bias adds a trained
  checkpoint's has; the latency benchmarks give them values first (benchmarks/export_latency.py
  `trained_like`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError, MercuryConfig


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, wrong format
        raise ConfigError(f"cannot read checkpoint {path}: {e}") from e
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def create_backbone(cfg: MercuryConfig) -> torch.nn.Module:
    """timm.create_model + weights. Returns the model in eval mode."""
    import timm

    if not timm.is_model(cfg.timm_model):
        raise ConfigError(f"timm has no model named {cfg.timm_model!r}")
    pretrained = cfg.pretrained and cfg.checkpoint is None
    try:
        model = timm.create_model(cfg.timm_model, pretrained=pretrained, **cfg.overrides)
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise ConfigError(f"could not fetch hub weights for {cfg.timm_model}: {e}. Without network, "
                              "pass a local checkpoint (--checkpoint) instead") from e
        raise ConfigError(f"timm could not build {cfg.timm_model} with {cfg.overrides}: {e}") from e
    except TypeError as e:
        raise ConfigError(f"bad timm overrides {cfg.overrides} for {cfg.timm_model}: {e}") from e
    if cfg.checkpoint is not None:
        sd = load_state_dict(cfg.checkpoint)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise ConfigError(f"checkpoint {cfg.checkpoint} does not fit {cfg.timm_model} "
                              f"with overrides {cfg.overrides}: {str(e).splitlines()[0]}") from e
    if cfg.mean is None or cfg.std is None:
        pc = getattr(model, "pretrained_cfg", {}) or {}
        cfg.mean = list(cfg.mean or pc.get("mean", (0.485, 0.456, 0.406)))
        cfg.std = list(cfg.std or pc.get("std", (0.229, 0.224, 0.225)))
    return model.eval()
