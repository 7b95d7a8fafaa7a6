"""FLOP counts of the head, the tail and the vanilla model, with torch.utils.flop_counter.

FlopCounterMode counts matmul-like ops (2 FLOPs per MAC); elementwise ops, softmax and the
reconstruction scatter are not counted, which is the convention papers (and fvcore) use.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .mercury import Mercury


def count_flops(fn, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
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
    head = count_flops(mercury.forward_head, images)
    tokens, idx = mercury.forward_head(images)
    tail = count_flops(mercury.forward_tail, tokens, idx)
    recon = count_flops(mercury.recon, tokens, idx)
    vanilla = count_flops(m, images)

    def vanilla_tail(x):
        for blk in m.blocks[mercury.split:]:
            x = blk(x)
        return m.forward_head(m.norm(x))

    full = torch.zeros(1, 1 + mercury.num_patches, mercury.dim)
    return {"head": head, "tail": tail, "reconstruction": recon, "total": head + tail, "vanilla": vanilla,
            "vanilla_tail": count_flops(vanilla_tail, full)}
