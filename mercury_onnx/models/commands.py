"""CLI command of this area: info (the split's geometry, meta-parameter count and FLOPs).

Defined here, registered on the app by mercury_onnx/cli.py. Module-level imports stay light
(no torch/timm/onnx): the command imports them itself.
"""
from __future__ import annotations

from typing import List, Optional

import typer

from ..app import fail, need_export_extra


def info(
    model: str = typer.Option(..., "--model", "-m", help="timm name, backbone JSON, or Mercury checkpoint"),
    checkpoint: Optional[str] = typer.Option(None, help="backbone weights (.safetensors/.pth) for a timm name"),
    keep_ratio: List[float] = typer.Option([0.5], "--keep-ratio", "-r"),
    prune_after_block: int = typer.Option(1),
    split_after_block: Optional[int] = typer.Option(None),
    region_size: int = typer.Option(2, help="tokens per side of a subregion"),
    reconstruction: str = typer.Option("meta-local"),
    prune_point: List[str] = typer.Option(["block", "attn"], "--prune-point",
                                          help="repeatable; head FLOPs are printed for each (default: both)"),
    img_size: Optional[int] = typer.Option(None), patch_size: Optional[int] = typer.Option(None),
    num_classes: Optional[int] = typer.Option(None),
) -> None:
    """Print N, K, the regions, the meta-parameter count and the head/tail FLOPs."""
    need_export_extra("info")
    from .config import ConfigError
    from .checkpoint import is_mercury_checkpoint, mercury_from_any
    from .config import PRUNE_POINTS
    from .flops import head_flops_at, split_flops

    overrides = {k: v for k, v in dict(img_size=img_size, patch_size=patch_size,
                                       num_classes=num_classes).items() if v is not None}
    bad = [p for p in prune_point if p not in PRUNE_POINTS]
    if bad:
        fail(f"--prune-point {bad[0]!r}: choose from {', '.join(PRUNE_POINTS)}")
    kw = dict(prune_after_block=prune_after_block, split_after_block=split_after_block,
              region_size=region_size, reconstruction=reconstruction, prune_point=prune_point[0])
    if not is_mercury_checkpoint(model) and not model.endswith(".json"):
        kw.update(checkpoint=checkpoint, overrides=overrides)
    try:
        models = mercury_from_any(model, keep_ratios=keep_ratio,
                                  **({} if is_mercury_checkpoint(model) else kw))
    except ConfigError as e:
        fail(str(e))
    first = models[0]
    n, g = first.num_patches, first.grid
    typer.echo(f"model            {first.cfg.timm_model} {first.cfg.overrides or ''}")
    typer.echo(f"backbone params  {first.backbone_params:,}")
    prefix = "CLS" if first.num_prefix_tokens == 1 else f"{first.num_prefix_tokens} prefix tokens (CLS first)"
    typer.echo(f"tokens N         {n} patches ({g}x{g} grid) + {prefix}, width D={first.dim}, "
               f"{first.depth} blocks")
    typer.echo(f"prune / split    after block {first.prune_at} / device runs blocks 0..{first.split - 1}"
               + (f" (prune point attn: block {first.prune_at}'s MLP runs on the kept tokens only)"
                  if first.cfg.prune_point == "attn" else ""))
    score = {"similarity": "distinctness d_i", "product": "CLS attention x distinctness a_i*d_i",
             "attention": "CLS attention a_i"}.get(first.cfg.score, first.cfg.score)
    proxy = first.score_proxy
    typer.echo(f"pruning          {first.cfg.pruning}, score {first.cfg.score} ({score})"
               + (f", on the post-attention stream through a {proxy.kind} score proxy of width {proxy.rank} "
                  f"({'fitted' if bool(proxy.fitted) else 'not fitted: calibrate fits it'})" if proxy is not None else ""))
    for m in models:
        l = g // m.cfg.region_size
        f = split_flops(m)
        typer.echo(f"\nkeep_ratio {m.keep / n:.4f}: K={m.keep} of N={n} kept "
                   f"({100 * (1 - m.keep / n):.1f}% pruned), {m.num_prefix_tokens + m.keep} tokens sent")
        typer.echo(f"  regions        {l}x{l} = {l * l} subregions of {m.cfg.region_size}x{m.cfg.region_size} tokens")
        typer.echo(f"  meta-params    {m.num_meta_params():,} ({m.cfg.reconstruction}) = "
                   f"{100 * m.num_meta_params() / m.backbone_params:.4f}% of the model (budget 0.13%)")
        typer.echo(f"  head FLOPs     {f['head'] / 1e9:.4f} G (prune point {m.cfg.prune_point})")
        for p in dict.fromkeys(prune_point):
            if p != m.cfg.prune_point:
                h = head_flops_at(m, p)
                typer.echo(f"                 {h / 1e9:.4f} G with prune point {p} ({h / f['head']:.3f}x)")
        typer.echo(f"  tail FLOPs     {f['tail'] / 1e9:.4f} G (blocks {f['tail'] - f['reconstruction']:,} "
                   f"= vanilla tail {f['vanilla_tail']:,}: "
                   f"{'equal' if f['tail'] - f['reconstruction'] == f['vanilla_tail'] else 'DIFFERENT'}; "
                   f"reconstruction {f['reconstruction']:,})")
        typer.echo(f"  vanilla FLOPs  {f['vanilla'] / 1e9:.4f} G")
