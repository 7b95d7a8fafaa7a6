import pytest
import timm
import torch

from mercury_onnx.models import ConfigError, MercuryConfig, build_mercury
from mercury_onnx.models.checkpoint import load_mercury, save_mercury
from mercury_onnx.models.flops import split_flops
from mercury_onnx.models.loading import create_backbone

SMALL224 = dict(timm_model="deit_small_patch16_224")


@pytest.fixture(scope="module")
def ref(ref_json):
    cfg = MercuryConfig.from_checkpoint_json(ref_json, keep_ratio=1.0)
    return cfg, create_backbone(cfg)


def _images(size, b=3, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recon", ["meta-ctx", "meta-pos", "zero", "duplicate", "mask", "none"])
def test_keep_ratio_one_reproduces_timm_reference(ref, recon):
    cfg, backbone = ref
    cfg = MercuryConfig(**{**cfg.to_dict(), "reconstruction": recon})
    m = build_mercury(cfg, backbone)
    vanilla = timm.create_model(cfg.timm_model, **cfg.overrides).eval()
    vanilla.load_state_dict(backbone.state_dict())
    x = _images(32)
    with torch.no_grad():
        assert torch.allclose(m(x), vanilla(x), atol=1e-5)


def test_keep_ratio_one_reproduces_timm_224():
    cfg = MercuryConfig(**SMALL224, keep_ratio=1.0)
    m = build_mercury(cfg)
    vanilla = timm.create_model(cfg.timm_model).eval()
    vanilla.load_state_dict(m.backbone.state_dict())
    x = _images(224, b=2)
    with torch.no_grad():
        assert torch.allclose(m(x), vanilla(x), atol=1e-5)


@pytest.mark.parametrize("size,keep,expected_k", [(32, 0.5, 32), (32, 0.25, 16), (224, 0.25, 49), (224, 0.5, 98)])
def test_head_outputs_exact_k_sorted_unique_and_head_tail_equals_forward(ref, size, keep, expected_k):
    if size == 32:
        cfg, backbone = ref
        cfg = MercuryConfig(**{**cfg.to_dict(), "keep_ratio": keep})
        m = build_mercury(cfg, backbone)
    else:
        m = build_mercury(MercuryConfig(**SMALL224, keep_ratio=keep))
    x = _images(size, b=2)
    with torch.no_grad():
        tokens, idx = m.forward_head(x)
        assert tokens.shape == (2, 1 + expected_k, m.dim) and idx.shape == (2, expected_k)
        for row in idx:
            assert len(set(row.tolist())) == expected_k
            assert torch.equal(row, torch.sort(row).values)
        # the kept tokens are the block output at those positions (CLS first)
        full = m.embed(x)
        for blk in m.backbone.blocks[:1]:
            full = blk(full)
        assert torch.allclose(tokens[:, 0], full[:, 0])
        assert torch.allclose(tokens[:, 1:], torch.gather(full[:, 1:], 1, idx[..., None].expand(-1, -1, m.dim)))


def _nearest_fill(full: torch.Tensor, idx: torch.Tensor, grid: int, p: int) -> torch.Tensor:
    """The unpruned sequence (B, P+N, D) with every pruned patch replaced by its spatially
    nearest kept patch (ties: the lower index), computed with plain Python loops."""
    out = full.clone()
    for b, row in enumerate(idx.tolist()):
        for i in set(range(grid * grid)) - set(row):
            y, x = divmod(i, grid)
            j = min(row, key=lambda j: ((j // grid - y) ** 2 + (j % grid - x) ** 2, j))
            out[b, p + i] = full[b, p + j]
    return out


def _timm_after(backbone, x: torch.Tensor, start: int) -> torch.Tensor:
    for blk in backbone.blocks[start:]:
        x = blk(x)
    return backbone.forward_head(backbone.norm(x))


@pytest.mark.parametrize("split", [1, 3])
def test_tail_is_timm_on_the_reconstructed_sequence(ref, split):
    """head -> tail against timm's own blocks run on the sequence the reconstruction should
    rebuild: meta-local at its init (b = U = A = 0) is 'copy the nearest received token'."""
    cfg, backbone = ref
    m = build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": 0.25, "split_after_block": split}), backbone)
    x = _images(32, b=2)
    with torch.no_grad():
        tokens, idx = m.forward_head(x)
        seq = backbone.blocks[0](m.embed(x))                             # (B, 1+N, D)
        rows = [[0] + [1 + i for i in row] for row in idx.tolist()]
        kept = torch.stack([seq[b, r] for b, r in enumerate(rows)])      # pruned after block 1
        for blk in backbone.blocks[1:split]:                             # the rest of the device's
            kept = blk(kept)
        assert torch.allclose(tokens, kept, atol=1e-5)
        for b, r in enumerate(rows):
            seq[b, r] = kept[b]
        want = _timm_after(backbone, _nearest_fill(seq, idx, m.grid, 1), split)
        assert torch.allclose(m.forward_tail(tokens, idx), want, atol=1e-4)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_base_patch16_224"])
@pytest.mark.parametrize("recon", ["meta-local", "meta-ctx", "meta-pos"])
def test_meta_rank_is_the_largest_within_budget(name, recon):
    """Budget = 0.13% of the backbone's parameters (the paper), counted here on a fresh timm
    model; the default rank's parameters fit it, one more rank would not, and asking for that
    rank is refused."""
    from mercury_onnx.models.reconstruction import MetaCtx, MetaLocal, MetaPos

    budget = 0.0013 * _count(timm.create_model(name))
    cfg = MercuryConfig(timm_model=name, keep_ratio=0.25, reconstruction=recon)
    m = build_mercury(cfg)
    rank = m.recon.pos_code.shape[1]
    n, d, g = m.num_patches, m.dim, m.grid

    def params(r):   # the same module built by hand at rank r, its real tensors counted
        return _count(MetaLocal(n, d, r, g) if recon == "meta-local" else
                      (MetaCtx if recon == "meta-ctx" else MetaPos)(n, d, r))

    assert m.num_meta_params() == params(rank) <= budget < params(rank + 1)
    assert rank >= (4 if name == "deit_base_patch16_224" else 1)
    if name == "deit_base_patch16_224":
        assert m.num_meta_params() < 115_000   # the paper: ~0.11 M for DeiT-B
    with pytest.raises(ConfigError, match=f"rank {rank + 1} does not fit the meta-parameter budget"):
        build_mercury(MercuryConfig(**{**cfg.to_dict(), "meta_rank": rank + 1}), m.backbone)
    assert build_mercury(MercuryConfig(**{**cfg.to_dict(), "meta_rank": rank}), m.backbone).num_meta_params() == params(rank)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_meta_local_without_scatter_equals_scatter_of_fill(ref, keep):
    """MetaLocal.forward skips the scatter; it must equal the definition scatter_kept(fill(...)):
    received tokens exactly in place, the CLS untouched, the corrected copy elsewhere."""
    from mercury_onnx.models.reconstruction import Reconstruction
    cfg, backbone = ref
    m = build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": keep, "reconstruction": "meta-local"}), backbone)
    for p in m.recon.parameters():   # calibrated-like, not the zero init (which makes it 'duplicate')
        p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    with torch.no_grad():
        tokens, idx = m.forward_head(_images(32, b=4))
        fast = m.recon(tokens, idx)
        slow = Reconstruction.forward(m.recon, tokens, idx)
    assert fast.shape == slow.shape == (4, 1 + m.num_patches, m.dim)
    assert torch.equal(fast[:, 0], tokens[:, 0])
    received = torch.gather(fast[:, 1:], 1, idx[..., None].expand(-1, -1, m.dim))
    assert torch.equal(received, tokens[:, 1:])
    assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-4)   # float association only (values ~50)
    assert (slow[:, 1:] - tokens[:, 1:2]).abs().amax() > 0.1   # the fill is not trivially the CLS/first token


def test_tail_flops_equal_vanilla(ref):
    cfg, backbone = ref
    for recon in ["meta-local", "meta-ctx", "meta-pos", "zero", "duplicate", "mask"]:
        m = build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": 0.25, "reconstruction": recon}), backbone)
        f = split_flops(m)
        assert f["tail"] - f["reconstruction"] == f["vanilla_tail"], recon
        assert f["reconstruction"] < 2e-3 * f["vanilla_tail"]   # U V is constant: export folds it
    # and 'none' really is cheaper: it runs on K+1 tokens
    m = build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": 0.25, "reconstruction": "none"}), backbone)
    assert split_flops(m)["tail"] < 0.4 * split_flops(m)["vanilla_tail"]


@pytest.mark.parametrize("pruning,recon", [("random", "meta-ctx"), ("topk-attn", "zero"), ("uniform", "duplicate"),
                                           ("janus", "mask"), ("topk-attn-fuse", "none"), ("regional", "generator")])
def test_baselines_share_the_interface(ref, pruning, recon):
    cfg, backbone = ref
    m = build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": 0.5, "pruning": pruning,
                                       "reconstruction": recon}), backbone)
    x = _images(32, b=2)
    with torch.no_grad():
        tokens, idx = m.forward_head(x)
        assert idx.shape == (2, 32)
        extra = 1 if pruning == "topk-attn-fuse" else 0
        assert tokens.shape == (2, 1 + 32 + extra, m.dim)
        assert m.forward_tail(tokens, idx).shape == (2, 10)
    if pruning == "janus":
        assert m.split > m.prune_at


def test_score_default_and_old_name(ref):
    cfg, backbone = ref
    assert MercuryConfig().score == "similarity"
    # checkpoints written before the default changed say "mercury" for the product a_i * d_i
    m = build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": 0.5, "score": "mercury"}), backbone)
    assert m.cfg.score == "product"
    with pytest.raises(ConfigError, match="unknown score 'sum'"):
        build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": 0.5, "score": "sum"}), backbone)


def test_error_cases(ref):
    cfg, backbone = ref
    base = cfg.to_dict()
    with pytest.raises(ConfigError, match="smaller than the 16 subregions"):
        build_mercury(MercuryConfig(**{**base, "keep_ratio": 0.1}), backbone)
    with pytest.raises(ConfigError, match="prune_after_block=13 is out of range"):
        build_mercury(MercuryConfig(**{**base, "prune_after_block": 13}), backbone)
    with pytest.raises(ConfigError, match="prune_after_block=0"):
        build_mercury(MercuryConfig(**{**base, "prune_after_block": 0}), backbone)
    with pytest.raises(ConfigError, match="split_after_block"):
        build_mercury(MercuryConfig(**{**base, "prune_after_block": 3, "split_after_block": 2}), backbone)
    with pytest.raises(ConfigError, match="does not divide"):
        build_mercury(MercuryConfig(**{**base, "region_size": 3, "keep_ratio": 0.5}), backbone)
    with pytest.raises(ConfigError, match="has no CLS token, and regional pruning with the product score reads"):
        build_mercury(MercuryConfig(timm_model="vit_small_patch16_224", score="product",
                                    overrides={"class_token": False, "global_pool": "avg", "depth": 2}))
    with pytest.raises(ConfigError, match="not square"):
        build_mercury(MercuryConfig(timm_model="deit_tiny_patch16_224", overrides={"img_size": (224, 160)}))
    with pytest.raises(ConfigError, match="timm has no model"):
        build_mercury(MercuryConfig(timm_model="no_such_vit"))
    with pytest.raises(ConfigError, match="checkpoint not found"):
        build_mercury(MercuryConfig(timm_model="deit_tiny_patch16_224", checkpoint="/nope.safetensors"))
    with pytest.raises(ConfigError, match="does not fit"):   # reference weights into a 224 model
        build_mercury(MercuryConfig(timm_model="deit_tiny_patch16_224", checkpoint=cfg.checkpoint))


def test_checkpoint_round_trip(ref, tmp_path):
    cfg, backbone = ref
    models = [build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": r}), backbone) for r in (0.5, 0.25)]
    with torch.no_grad():
        for m in models:
            for p in m.recon.parameters():
                p.add_(torch.randn_like(p))
    save_mercury(tmp_path / "ck", models, {"note": "test"})
    loaded = load_mercury(tmp_path / "ck.json")
    x = _images(32, b=2)
    with torch.no_grad():
        for a, b in zip(models, loaded):
            assert a.keep == b.keep
            assert torch.allclose(a(x), b(x), atol=1e-5)   # fused vs unfused SDPA may differ in ulps
    with pytest.raises(ConfigError, match="not for K"):
        load_mercury(tmp_path / "ck.json", keep_tokens=[40])
