"""FLOP counts of the head, the tail and the vanilla model, with torch.utils.flop_counter.

FlopCounterMode counts matmul-like ops (2 FLOPs per MAC); elementwise ops, softmax and the
reconstruction scatter are not counted, which is the convention papers (and fvcore) use.
The attention matmuls (QK^T, AV) ARE counted: timm's fused SDPA is invisible to the counter on
CPU, so counting switches every Attention to timm's unfused path for the duration.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from .mercury import Mercury


@contextmanager
def _unfused_attention(module: torch.nn.Module):
    attns = [m for m in module.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attns]
    for m in attns:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, f in zip(attns, saved):
            m.fused_attn = f


def count_flops(fn, *args, module: torch.nn.Module | None = None) -> int:
    """FLOPs of fn(*args); `module` (default: fn itself if it is a Module) gets unfused attention."""
    module = module if module is not None else (fn if isinstance(fn, torch.nn.Module) else None)
    with torch.no_grad(), _unfused_attention(module or torch.nn.Module()), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def _dummy_images(mercury: Mercury, batch: int = 1) -> torch.Tensor:
    h, w = mercury.backbone.patch_embed.img_size
    return torch.zeros(batch, 3, h, w)


def split_flops(mercury: Mercury) -> dict[str, int]:
    """FLOPs per image: head, tail, the reconstruction's share of the tail, Mercury total,
    vanilla total, and the vanilla part of the tail (blocks after the split + norm +
    classifier on all N tokens). With any reconstruction that rebuilds N tokens,
    tail - reconstruction == vanilla_tail exactly; the reconstruction itself is tiny (meta-pos:
    a data-independent U V that export folds to constants; meta-ctx: 4 D r per image)."""
    images = _dummy_images(mercury)
    m = mercury.backbone
    head = count_flops(mercury.forward_head, images, module=mercury)
    tokens, idx = mercury.forward_head(images)
    tail = count_flops(mercury.forward_tail, tokens, idx, module=mercury)
    recon = count_flops(mercury.recon, tokens, idx)
    vanilla = count_flops(m, images)

    def vanilla_tail(x):
        for blk in m.blocks[mercury.split:]:
            x = blk(x)
        return m.forward_head(m.norm(x))

    full = torch.zeros(1, mercury.num_prefix_tokens + mercury.num_patches, mercury.dim)
    return {"head": head, "tail": tail, "reconstruction": recon, "total": head + tail, "vanilla": vanilla,
            "vanilla_tail": count_flops(vanilla_tail, full, module=m)}


def head_flops_at(mercury: Mercury, prune_point: str) -> int:
    """FLOPs per image of `mercury`'s head were it pruning at `prune_point` (same backbone,
    same K; the head's FLOPs do not depend on the meta-parameters)."""
    import copy

    from .mercury import build_mercury

    m = mercury
    if prune_point != mercury.cfg.prune_point:
        cfg = copy.deepcopy(mercury.cfg)
        cfg.prune_point, cfg.keep_tokens = prune_point, mercury.keep
        m = build_mercury(cfg, mercury.backbone)
    return count_flops(m.forward_head, _dummy_images(m), module=m)
