"""Prefix tokens (timm's `num_prefix_tokens`): a distilled DeiT's CLS + distillation token, a
ViT's CLS + registers, registers without a CLS. They are sent first, always, never pruned, and
the tail gives what timm's own blocks and head give on the sequence Mercury rebuilds.
Random weights (nothing can be downloaded); inputs are seeded noise images."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Attention

from mercury_onnx.models import ConfigError, MercuryConfig, build_mercury
from mercury_onnx.models.loading import create_backbone
from mercury_onnx.models.mercury import CLSAttention

from .test_mercury import _images, _nearest_fill, _timm_after

DISTILLED = dict(timm_model="deit_tiny_distilled_patch16_224")
REG4 = dict(timm_model="vit_small_patch14_reg4_dinov2", overrides=dict(img_size=56, depth=2, num_classes=10))
REG4_NO_CLS = dict(timm_model="vit_base_patch16_reg4_gap_256",
                   overrides=dict(img_size=64, depth=2, num_classes=10, embed_dim=192, num_heads=3))


def _vanilla(kw: dict, backbone) -> torch.nn.Module:
    v = timm.create_model(kw["timm_model"], **kw.get("overrides", {})).eval()
    v.load_state_dict(backbone.state_dict())
    return v


@pytest.fixture(scope="module")
def distilled():
    return build_mercury(MercuryConfig(**DISTILLED, keep_ratio=0.25))


@pytest.mark.parametrize("kw,prefix", [(DISTILLED, 2), (REG4, 5), (REG4_NO_CLS, 4)])
def test_keep_all_reproduces_timm(kw, prefix):
    m = build_mercury(MercuryConfig(**kw, keep_ratio=1.0))
    assert m.num_prefix_tokens == prefix
    x = _images(m.backbone.patch_embed.img_size[0], b=2)
    with torch.no_grad():
        tokens, idx = m.forward_head(x)
        assert tokens.shape[1] == prefix + m.num_patches
        assert torch.allclose(m.forward_tail(tokens, idx), _vanilla(kw, m.backbone)(x), atol=1e-5)


@pytest.mark.parametrize("kw,score", [(DISTILLED, "similarity"), (DISTILLED, "product"), (REG4, "similarity"),
                                      (REG4, "attention"), (REG4_NO_CLS, "similarity")])
def test_prefix_sent_first_never_pruned_and_tail_is_timm(kw, score):
    m = build_mercury(MercuryConfig(**kw, keep_ratio=0.5, score=score))
    p, g, k = m.num_prefix_tokens, m.grid, m.keep
    x = _images(m.backbone.patch_embed.img_size[0], b=2)
    with torch.no_grad():
        tokens, idx = m.forward_head(x)
        full = m.backbone.blocks[0](m.embed(x))                          # (B, P+N, D)
        assert tokens.shape == (2, p + k, m.dim) and idx.shape == (2, k)
        assert torch.equal(tokens[:, :p], full[:, :p])                   # every prefix token, first
        kept = torch.gather(full[:, p:], 1, idx[..., None].expand(-1, -1, m.dim))
        assert torch.equal(tokens[:, p:], kept)
        for row in idx.tolist():
            assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < g * g
            assert {(i // g // 2) * (g // 2) + i % g // 2 for i in row} == set(range((g // 2) ** 2))
        want = _timm_after(m.backbone, _nearest_fill(full, idx, g, p), 1)
        assert torch.allclose(m.forward_tail(tokens, idx), want, atol=1e-4)


def test_distilled_tail_averages_the_cls_and_distillation_heads(distilled):
    """timm's VisionTransformerDistilled in eval: (head(x_cls) + head_dist(x_dist)) / 2."""
    m = distilled
    bb = m.backbone
    assert not torch.allclose(bb.head.weight, bb.head_dist.weight)      # two different heads
    x = _images(224, b=2, seed=3)
    with torch.no_grad():
        tokens, idx = m.forward_head(x)
        seq = _nearest_fill(bb.blocks[0](m.embed(x)), idx, m.grid, 2)
        for blk in bb.blocks[1:]:
            seq = blk(seq)
        seq = bb.norm(seq)
        want = (bb.head(seq[:, 0]) + bb.head_dist(seq[:, 1])) / 2
        assert torch.allclose(m.forward_tail(tokens, idx), want, atol=1e-4)
        assert not torch.allclose(bb.head(seq[:, 0]), want, atol=1e-3)   # the average, not the CLS head


def test_registers_without_cls_refuse_attention_scores_with_the_reason():
    for score in ("product", "attention"):
        with pytest.raises(ConfigError, match="has no CLS token, and regional pruning with the "
                                              f"{score} score reads the CLS token's attention"):
            build_mercury(MercuryConfig(**REG4_NO_CLS, keep_ratio=0.5, score=score))
    with pytest.raises(ConfigError, match="topk-attn pruning"):
        build_mercury(MercuryConfig(**REG4_NO_CLS, keep_ratio=0.5, pruning="topk-attn", reconstruction="zero"))


@pytest.mark.parametrize("pruning,score,patched", [
    ("regional", "similarity", False), ("random", "similarity", False), ("uniform", "similarity", False),
    ("regional", "product", True), ("regional", "attention", True), ("topk-attn", "similarity", True),
    ("janus", "similarity", True)])
def test_cls_attention_patch_only_where_the_selection_reads_it(ref_json, pruning, score, patched):
    cfg = MercuryConfig.from_checkpoint_json(ref_json, keep_ratio=0.5, pruning=pruning, score=score,
                                             reconstruction="zero")
    m = build_mercury(cfg, create_backbone(cfg))                         # a fresh backbone each
    kinds = {type(b.attn) for b in m.backbone.blocks}
    assert kinds == ({Attention, CLSAttention} if patched else {Attention})
    assert all(type(m.backbone.blocks[i].attn) is CLSAttention for i in m.prune_blocks) == patched
    with torch.no_grad():
        x, cls_attn = m.forward_prefix(_images(32, b=2))
        assert (cls_attn is not None) == patched
        if patched:
            assert cls_attn.shape == (2, 64)
            with pytest.raises(ConfigError, match="reads the CLS attention, but the prefix was run without it"):
                m.prune(x, None)
        else:
            m.prune(x, None)                                             # never read
