"""The Mercury checkpoint: one backbone + meta-parameters for one or more keep ratios.

Files (same stem):
- `NAME.safetensors`: `backbone.<timm key>` tensors and `meta.<K>.<param>` tensors, one group
  per kept-token count K (prune point attn: also the pruning block's fitted score proxy,
  `backbone.blocks.<i>.score_proxy.{a,b,c,fitted}`, shared by every K);
- `NAME.json`: {"format": "mercury-checkpoint/1", "config": MercuryConfig (backbone part and
  method settings), "keep_tokens": [K, ...], "calibration": {...free-form report...}}.
- When the meta-parameters were calibrated with a token codec in the loop (`calibrate
  --codec`), that codec too: `codec.<K>.<buffer>` tensors and "codecs": {"K": {"name": "16x4",
  "num_prefix": 1, "mean": "position", "variance_kept": ...}} in the JSON.

Self-contained on purpose: `export` needs nothing else, and a checkpoint copied to another
machine still works. The one exception is the calibration shipped for the reference backbone
(`reference`, `reference:PATH.json`; see models/reference.py): meta-parameters only, the
backbone found by path and checked by sha256.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from . import reference
from .config import ConfigError, MercuryConfig
from .mercury import Mercury, build_mercury, load_meta, models_sharing_backbone

FORMAT = "mercury-checkpoint/1"


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_mercury(path: str | Path, models: list[Mercury], calibration: dict | None = None) -> tuple[Path, Path]:
    """Save several Mercury wrappers that share one backbone (one per keep ratio)."""
    from safetensors.torch import save_file

    if not models:
        raise ValueError("nothing to save")
    backbone = models[0].backbone
    if any(m.backbone is not backbone for m in models):
        raise ValueError("all models in one checkpoint must share the backbone")
    proxy = models[0].cfg.uses_score_proxy   # a proxy another wrapper attached is not this checkpoint's
    tensors = {f"backbone.{k}": v.detach().contiguous() for k, v in backbone.state_dict().items()
               if proxy or ".score_proxy." not in k}
    codecs = {}
    for m in models:
        for k, v in m.recon.state_dict().items():
            tensors[f"meta.{m.keep}.{k}"] = v.detach().contiguous()
        if m.codec is not None:
            tensors.update({f"codec.{m.keep}.{k}": v.detach().contiguous() for k, v in m.codec.state_dict().items()})
            codecs[str(m.keep)] = {"name": m.codec.name, "num_prefix": m.codec.num_prefix,
                                   "mean": m.codec.mean_mode, "variance_kept": m.codec.variance_kept}
    cfg = copy.deepcopy(models[0].cfg)
    cfg.checkpoint, cfg.pretrained, cfg.keep_ratio, cfg.keep_tokens = None, False, None, None
    weights, meta = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(weights))
    meta.write_text(json.dumps({"format": FORMAT, "config": cfg.to_dict(),
                                "keep_tokens": list(dict.fromkeys(m.keep for m in models)),
                                "calibration": calibration or {},
                                **({"codecs": codecs} if codecs else {})}, indent=1))
    return weights, meta


def is_mercury_checkpoint(path: str | Path) -> bool:
    if reference.is_reference_name(path):    # the calibration shipped for the reference backbone
        return True
    _, meta = checkpoint_paths(path)
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_checkpoint_json(path: str | Path) -> dict:
    if reference.is_reference_name(path):
        return reference.checkpoint_json(str(path))
    _, meta = checkpoint_paths(path)
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read Mercury checkpoint {meta}: {e}") from e
    if info.get("format") != FORMAT:
        raise ConfigError(f"{meta} is not a Mercury checkpoint (format {info.get('format')!r}); "
                          "run `mercury-onnx calibrate` to make one")
    return info


def load_mercury(path: str | Path, keep_tokens: list[int] | None = None, **overrides) -> list[Mercury]:
    """Mercury wrappers (sharing one backbone) for the stored keep counts, or those asked for."""
    from safetensors.torch import load_file

    if reference.is_reference_name(path):
        return reference.load(str(path), keep_tokens, **overrides)
    weights, _ = checkpoint_paths(path)
    info = read_checkpoint_json(path)
    stored = info["keep_tokens"]
    wanted = stored if keep_tokens is None else keep_tokens
    missing = [k for k in wanted if k not in stored]
    if missing:
        raise ConfigError(f"{weights.name} has meta-parameters for K={stored}, not for K={missing}; "
                          "calibrate those keep ratios first")
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise ConfigError(f"cannot read {weights}: {e}") from e
    stored_point = info["config"].get("prune_point", "block")   # checkpoints before the option: "block"
    if overrides.get("prune_point", stored_point) != stored_point:
        raise ConfigError(f"{weights.name} was calibrated with prune_point={stored_point!r}; its meta-parameters "
                          f"fill tokens of that prune point, not of {overrides['prune_point']!r}. Calibrate "
                          f"a checkpoint with --prune-point {overrides['prune_point']}")
    # checkpoints written before the score proxy scored the post-attention stream as it is, and
    # those written before its gelu kind have a linear one
    base = MercuryConfig.from_dict({"score_proxy_rank": 0, "score_proxy_kind": "linear", **info["config"], **overrides})
    bb_sd = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    backbone = None
    models = []
    for k in wanted:
        cfg = copy.deepcopy(base)
        cfg.keep_tokens = k
        if backbone is None:
            m = build_mercury(cfg)
            m.backbone.load_state_dict(bb_sd)
            backbone = m.backbone
        else:
            m = build_mercury(cfg, backbone)
        load_meta(m, tensors, k)
        spec = info.get("codecs", {}).get(str(k))
        if spec:
            from .codec import TokenCodec, parse_codec

            d, b = parse_codec(spec["name"])
            m.codec = TokenCodec(m.dim, m.num_patches, d, b, spec["num_prefix"])
            m.codec.load_state_dict({n.removeprefix(f"codec.{k}."): v for n, v in tensors.items()
                                     if n.startswith(f"codec.{k}.")})
            m.codec.mean_mode, m.codec.variance_kept = spec.get("mean", "position"), spec.get("variance_kept")
        models.append(m.eval())
    return models


def mercury_from_any(source: str, keep_tokens: list[int] | None = None,
                     keep_ratios: list[float] | None = None, **overrides) -> list[Mercury]:
    """Mercury checkpoint path, a backbone JSON (../shared/models/*.json), or a timm name."""
    if is_mercury_checkpoint(source):
        if keep_ratios is None:
            return load_mercury(source, keep_tokens, **overrides)
        models = load_mercury(source, None, **overrides)
        n = models[0].num_patches
        wanted = [MercuryConfig(keep_ratio=r).num_keep(n) for r in keep_ratios]
        by_k = {m.keep: m for m in models}
        missing = [k for k in wanted if k not in by_k]
        if missing:
            raise ConfigError(f"{source} has meta-parameters for K={sorted(by_k)} "
                              f"(keep ratios {[round(k / n, 4) for k in sorted(by_k)]}), not for K={missing}")
        return [by_k[k] for k in wanted]
    if source.endswith(".json"):
        base = MercuryConfig.from_checkpoint_json(source, **overrides)
    else:
        base = MercuryConfig(timm_model=source, **overrides)
    return models_sharing_backbone(base, keep_ratios=keep_ratios or [base.keep_ratio or 0.5])
