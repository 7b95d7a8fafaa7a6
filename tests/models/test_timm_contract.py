"""What CLSAttention (mercury_onnx/models/mercury.py) takes from timm: a copy of timm 1.0's
Attention.forward that also keeps the CLS row of the attention. These tests fail loudly when
timm's Attention changes in a way the copy depends on: its forward's signature, the attributes
the copy reads, or what it computes (compared on random input, fused and unfused, with every
option the copy handles). pyproject.toml pins timm to the tested range."""
from __future__ import annotations

import copy
import inspect

import pytest
import timm
import torch
from timm.layers import Attention, LayerNorm
from timm.models.vision_transformer import Block

from mercury_onnx.models.mercury import CLSAttention

# what CLSAttention.forward reads from the module
READS = ("num_heads", "head_dim", "attn_dim", "scale", "qkv", "q_norm", "k_norm", "attn_drop",
         "norm", "gate", "proj", "proj_drop")
OPTIONS = [dict(), dict(qkv_bias=True), dict(qk_norm=True, norm_layer=LayerNorm),
           dict(scale_norm=True, norm_layer=LayerNorm), dict(gated=True), dict(attn_head_dim=16)]


def test_timm_version_is_in_the_tested_range():
    major, minor, patch = (int(p) for p in timm.__version__.split(".")[:3])
    assert (major, minor) == (1, 0) and patch >= 31, (
        f"timm {timm.__version__}: CLSAttention was checked against timm 1.0.31+ (pyproject.toml)")


def test_attention_forward_signature():
    params = list(inspect.signature(Attention.forward).parameters.values())
    assert [(p.name, p.default) for p in params] == [
        ("self", inspect.Parameter.empty), ("x", inspect.Parameter.empty), ("attn_mask", None),
        ("is_causal", False)], "timm's Attention.forward signature changed: update CLSAttention"
    assert list(inspect.signature(CLSAttention.forward).parameters) == [p.name for p in params]


def _pair(seed: int, **options) -> tuple[Attention, CLSAttention]:
    torch.manual_seed(seed)
    ref = Attention(64, num_heads=4, **options).eval()
    for p in ref.parameters():                 # no zero / identity init hiding a missed term
        p.data.normal_(0, 0.2)
    mine = copy.deepcopy(ref)
    mine.__class__ = CLSAttention
    mine.num_prefix_tokens = 2
    return ref, mine


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("fused", [True, False])
def test_cls_attention_computes_what_timm_computes(options, fused):
    ref, mine = _pair(0, **options)
    missing = [a for a in READS if not hasattr(ref, a)]
    assert not missing, f"timm's Attention no longer has {missing}: update CLSAttention"
    ref.fused_attn = fused
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), mine(x)
    assert got.shape == want.shape == (3, 11, 64)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()

    # the CLS row, from the definition: softmax(q k^T / sqrt(hd)), query 0, keys after the prefix
    b, n, _ = x.shape
    with torch.no_grad():
        q, k, _ = ref.qkv(x).reshape(b, n, 3, ref.num_heads, ref.head_dim).permute(2, 0, 3, 1, 4)
        q, k = ref.q_norm(q), ref.k_norm(k)
        attn = (q @ k.transpose(-2, -1) / ref.head_dim ** 0.5).softmax(-1)     # (B, H, N, N)
    assert mine.cls_attn.shape == (3, 9)
    assert torch.allclose(mine.cls_attn, attn[:, :, 0, 2:].mean(1), atol=1e-6)


def test_patched_block_equals_timm_block():
    """Inside a Block (LayerScale, the residuals), as Mercury swaps it in."""
    torch.manual_seed(0)
    blk = Block(64, 4, qkv_bias=True, init_values=0.5).eval()
    mine = copy.deepcopy(blk)
    mine.attn.__class__ = CLSAttention
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        assert torch.allclose(mine(x), blk(x), atol=1e-5)
    assert mine.attn.cls_attn.shape == (2, 16)
