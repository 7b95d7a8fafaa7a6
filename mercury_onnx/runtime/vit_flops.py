"""Analytic FLOPs of a plain ViT/DeiT, torch-free, for modelling device and cloud compute.

Same convention as `mercury_onnx.models.flops` (torch's FlopCounterMode): 2 FLOPs per MAC of
the matmul-like ops (patch-embed conv, linear layers, the two attention matmuls); softmax,
norms, GELU and the pruning score are not counted. On T tokens of width D, one block costs

    qkv 2·T·D·3D + q@kᵀ 2·T²·D + attn@v 2·T²·D + proj 2·T·D² + MLP 2·2·T·D·(r·D)
    = (8 + 4r)·T·D² + 4·T²·D            (r = MLP ratio, 4 for ViT/DeiT)

With prune point "attn" the pruning block's attention half runs on P+N tokens and its MLP
half on the P+K kept ones; the score proxy of rank s (models/pruning.ScoreProxy) adds its two
thin matmuls on P+N tokens, 4·(P+N)·D·s.

Patch embedding is 2·N·(C·p²)·D, the classifier 2·D·classes. The test suite checks these
against the torch counter on DeiT-T/S/B.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# the score proxy's rank an attn export has by default (MercuryConfig.score_proxy_rank; torch-free copy)
SCORE_PROXY_RANK = 64

# timm ViT/DeiT widths, depths (heads do not change the FLOPs)
_WIDTHS = {"tiny": (192, 12), "small": (384, 12), "base": (768, 12), "large": (1024, 24), "huge": (1280, 32)}


@dataclass
class VitGeometry:
    num_patches: int         # N
    dim: int                 # D
    depth: int
    patch_size: int
    num_classes: int
    in_chans: int = 3
    mlp_ratio: float = 4.0
    num_prefix_tokens: int = 1   # P: the CLS (+ a distilled DeiT's distillation token, + registers)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "VitGeometry":
        o = manifest.get("overrides", {}) or {}
        name = manifest.get("timm_model", "")
        m = re.search(r"patch(\d+)", name)
        patch = int(o.get("patch_size", m.group(1) if m else 16))
        classes = o.get("num_classes") or len(manifest.get("classes") or []) or 1000
        return cls(num_patches=int(manifest["num_patches"]), dim=int(manifest["dim"]),
                   depth=int(manifest["depth"]), patch_size=patch, num_classes=int(classes),
                   mlp_ratio=float(o.get("mlp_ratio", 4.0)),
                   num_prefix_tokens=int(manifest.get("num_prefix_tokens", 1)))

    @classmethod
    def from_timm_name(cls, name: str, img_size: int | None = None, patch_size: int | None = None,
                       num_classes: int = 1000) -> "VitGeometry":
        """deit_/vit_{tiny,small,base,large,huge}_patch{P}_{S}: what a name implies."""
        m = re.fullmatch(r"(?:deit|vit)_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(?:\..*)?", name)
        if not m:
            raise ValueError(f"cannot infer the geometry of {name!r} without torch: use a "
                             "deit_/vit_{tiny,small,base,large}_patchP_S name or an export folder")
        dim, depth = _WIDTHS[m.group(1)]
        p = patch_size or int(m.group(2))
        s = img_size or int(m.group(3))
        return cls(num_patches=(s // p) ** 2, dim=dim, depth=depth, patch_size=p, num_classes=num_classes)


def attn_flops(tokens: int, dim: int) -> int:
    """A block's attention half: qkv, q@kᵀ, attn@v, proj."""
    return int(8 * tokens * dim * dim + 4 * tokens * tokens * dim)


def mlp_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """A block's MLP half: fc1, fc2."""
    return int(4 * mlp_ratio * tokens * dim * dim)


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    return attn_flops(tokens, dim) + mlp_flops(tokens, dim, mlp_ratio)


def embed_flops(g: VitGeometry) -> int:
    return 2 * g.num_patches * g.in_chans * g.patch_size ** 2 * g.dim


def classifier_flops(g: VitGeometry) -> int:
    return 2 * g.dim * g.num_classes


def vanilla_flops(g: VitGeometry) -> int:
    """The whole model on all P+N tokens."""
    return (embed_flops(g) + g.depth * block_flops(g.num_prefix_tokens + g.num_patches, g.dim, g.mlp_ratio)
            + classifier_flops(g))


def head_flops(g: VitGeometry, split: int = 1, token_schedule: list[int] | None = None,
               prune_point: str = "block", keep: int | None = None, score_proxy_rank: int = 0) -> int:
    """Device part: embedding, then `split` blocks. Without a schedule every device block runs
    on P+N tokens (Mercury prunes after the last device block); with prune_point "attn" the
    last device block's MLP half runs on the P+keep kept tokens only (and its score proxy, of
    rank score_proxy_rank, on all P+N). With a schedule
    (Janus-like progressive pruning), block 0 runs on P+N tokens and block i>0 on P+schedule[i-1]."""
    p = g.num_prefix_tokens
    tokens = [p + g.num_patches] * split
    if token_schedule is not None:
        tokens = [p + g.num_patches] + [p + k for k in token_schedule[: split - 1]]
    if prune_point == "attn" and token_schedule is None:
        if keep is None:
            raise ValueError("prune_point 'attn' needs keep (the kept patch tokens)")
        last = tokens.pop()
        return (embed_flops(g) + sum(block_flops(t, g.dim, g.mlp_ratio) for t in tokens)
                + attn_flops(last, g.dim) + mlp_flops(p + keep, g.dim, g.mlp_ratio)
                + 4 * last * g.dim * score_proxy_rank)
    return embed_flops(g) + sum(block_flops(t, g.dim, g.mlp_ratio) for t in tokens)


def tail_flops(g: VitGeometry, split: int = 1, meta_rank: int = 0) -> int:
    """Cloud part: reconstruction (meta-ctx: about 4·D·r), then blocks split..depth on all P+N
    tokens and the classifier (exactly the vanilla tail)."""
    return ((g.depth - split) * block_flops(g.num_prefix_tokens + g.num_patches, g.dim, g.mlp_ratio)
            + classifier_flops(g) + 4 * g.dim * meta_rank)


def janus_schedule(n: int, k: int, steps: int, decay: float = 0.5) -> list[int]:
    """Token counts after each of `steps` pruning blocks, N -> K (same rule as
    mercury_onnx.models.pruning.janus_schedule, kept here torch-free)."""
    if steps <= 1:
        return [k]
    weights = [decay ** i for i in range(steps)]
    counts, removed = [], 0.0
    for w in weights:
        removed += (n - k) * w / sum(weights)
        counts.append(n - int(round(removed)))
    counts[-1] = k
    return counts
