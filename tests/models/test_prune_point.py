"""prune_point="attn": block 1's attention on all tokens, selection on the post-attention
stream, block 1's MLP on the kept tokens only. Checked against timm's own (unpatched) block
on real CIFAR-10 images, in torch and in ORT; FLOPs by count; checkpoints keep their point."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from mercury_onnx.export.convert import export_onnx
from mercury_onnx.export.images import load_images
from mercury_onnx.export.validate import session
from mercury_onnx.models import ConfigError, MercuryConfig, build_mercury
from mercury_onnx.models.checkpoint import load_mercury, save_mercury
from mercury_onnx.models.flops import head_flops_at, split_flops
from mercury_onnx.models.loading import create_backbone
from mercury_onnx.runtime import vit_flops as VF

from .test_pruning_reference import reference_rows, reference_scores


@pytest.fixture(scope="module")
def ref(ref_json, cifar_test):
    """Reference backbone, attn-point wrappers at keep 0.5 / 0.25 (score proxy fit on 512 real
    train images, as calibrate does), an unpatched timm copy and 64 real test images."""
    from mercury_onnx.calib.calibrate import run_prefix
    from mercury_onnx.calib.data import load_image_set, preprocess_for

    cfg = MercuryConfig.from_checkpoint_json(ref_json, keep_ratio=0.5, prune_point="attn")
    backbone = create_backbone(cfg)
    vanilla = timm.create_model(cfg.timm_model, **cfg.overrides).eval()
    vanilla.load_state_dict(backbone.state_dict())
    models = [build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": r}), backbone) for r in (0.5, 0.25)]
    train, _ = load_image_set(cifar_test.parent / "train", preprocess_for(models[0]), cfg.classes, count=512,
                              progress=False)
    rep = models[0].fit_score_proxy(run_prefix(models[0], train, progress=False).x)
    assert rep["rank"] == MercuryConfig.score_proxy_rank == 64 and rep["kind"] == "gelu" and rep["explained"] > 0.9, rep
    assert models[1].fit_score_proxy(run_prefix(models[1], train.subset(range(8)), progress=False).x) is None  # shared
    images, _ = load_images(cifar_test, 64, (32, 32), cfg.mean, cfg.std)
    return models, vanilla, torch.from_numpy(images)


def test_attn_head_is_timm_block_with_the_mlp_on_kept_tokens(ref):
    models, vanilla, images = ref
    blk = vanilla.blocks[0]
    with torch.no_grad():
        x = vanilla.norm_pre(vanilla.patch_drop(vanilla._pos_embed(vanilla.patch_embed(images))))
        post_attn = x + blk.attn(blk.norm1(x))                         # (B, 1+N, D) timm's fused SDPA
        for m in models:                                               # K = 32 and K = 16
            prefix, cls_attn = m.forward_prefix(images)
            assert torch.allclose(prefix, post_attn, atol=1e-5)
            tokens, idx = m.forward_head(images)
            # the selection is the float64 reference's, on the post-attention stream through the proxy
            scored = m.score_stream(prefix)
            p = m.score_proxy                                          # the default kind, gelu
            hidden = torch.nn.functional.gelu(blk.norm2(prefix) @ p.a + p.a0)
            assert torch.allclose(scored, prefix + hidden @ p.b + p.c, atol=1e-5)
            assert torch.equal(idx, reference_rows(reference_scores(scored, cls_attn), m.keep, m.grid,
                                                   m.cfg.region_size))
            kept = torch.stack([prefix[b, [0] + (idx[b] + 1).tolist()] for b in range(len(idx))])
            assert torch.allclose(tokens, kept + blk.mlp(blk.norm2(kept)), atol=1e-5)
            # the same kept tokens through timm's whole block: MLP is per token, so equal
            full = blk(x)
            assert torch.allclose(tokens, torch.stack([full[b, [0] + (idx[b] + 1).tolist()]
                                                       for b in range(len(idx))]), atol=1e-5)


def test_score_proxy_selects_closer_to_the_whole_block(ref):
    """On real test images the proxy's selection overlaps block's (after the MLP) more than a
    selection on the post-attention stream as it is; unfitted (zeros) it is that stream."""
    models, vanilla, images = ref
    blk = vanilla.blocks[0]
    with torch.no_grad():
        for m in models:
            prefix, _ = m.forward_prefix(images)

            def rows(x):
                return m.regional_rows(x, None, m.keep)[:, 1:, 0] - 1   # scores score_stream(x)

            proxy = m.score_proxy
            whole = reference_rows(reference_scores(prefix + blk.mlp(blk.norm2(prefix)), None), m.keep, m.grid,
                                   m.cfg.region_size)
            params = (proxy.a, proxy.a0, proxy.b, proxy.c)
            saved = [t.clone() for t in params]
            try:
                for t in params:
                    t.zero_()
                assert torch.equal(m.score_stream(prefix), prefix)
                raw = rows(prefix)
            finally:
                for t, v in zip(params, saved):
                    t.copy_(v)
            fitted = rows(prefix)

            def overlap(idx):
                return np.mean([len(set(a.tolist()) & set(b.tolist())) / m.keep for a, b in zip(idx, whole)])

            assert overlap(fitted) > overlap(raw) + 0.05, (m.keep, overlap(fitted), overlap(raw))


def test_keep_one_is_the_vanilla_model(ref):
    models, vanilla, images = ref
    m = build_mercury(MercuryConfig(**{**models[0].cfg.to_dict(), "keep_ratio": 1.0, "keep_tokens": None}),
                      models[0].backbone)
    with torch.no_grad():
        assert torch.allclose(m(images[:8]), vanilla(images[:8]), atol=1e-5)


@pytest.mark.parametrize("which", [0, 1])
def test_onnx_attn_head_selects_what_torch_selects(ref, tmp_path, which):
    from mercury_onnx.export.graphs import HEAD_IO, HeadGraph

    models, _, images = ref
    m = models[which]
    with torch.no_grad():
        tokens, idx = m.forward_head(images)
    export_onnx(HeadGraph(m), (images[:2],), tmp_path / "head.onnx", *HEAD_IO)
    got_tokens, got_idx = session(tmp_path / "head.onnx").run(None, {"images": images.numpy()})
    assert np.array_equal(got_idx, idx.numpy())
    assert np.abs(got_tokens - tokens.numpy()).max() < 1e-4


@pytest.mark.parametrize("name,keep", [("deit_tiny_patch16_224", 0.25),
                                       pytest.param("deit_base_patch16_224", 0.25, marks=pytest.mark.slow)])
def test_attn_head_flops_by_count(name, keep):
    from timm.layers import set_fused_attn

    set_fused_attn(False)   # torch's counter does not see the fused SDPA's matmuls on CPU
    try:
        block = build_mercury(MercuryConfig(timm_model=name, keep_ratio=keep))
        f = split_flops(block)
        attn = head_flops_at(block, "attn")
    finally:
        set_fused_attn(True)
    g = VF.VitGeometry.from_timm_name(name)
    n, k = g.num_patches, block.keep
    # same embedding, attention and selection; the MLP runs on 1+K rows instead of 1+N, and the
    # score proxy's two thin matmuls (width 64) on all 1+N rows
    r = VF.SCORE_PROXY_RANK
    assert r == MercuryConfig.score_proxy_rank
    assert f["head"] - attn == VF.mlp_flops(1 + n, g.dim) - VF.mlp_flops(1 + k, g.dim) - 4 * (1 + n) * g.dim * r
    assert VF.head_flops(g, 1, prune_point="attn", keep=k, score_proxy_rank=r) == pytest.approx(attn, rel=0.02)
    assert VF.head_flops(g, 1, prune_point="attn", keep=k, score_proxy_rank=r) / VF.head_flops(g, 1) == \
        pytest.approx(attn / f["head"], rel=0.01)


def test_bench_setup_uses_the_prune_points_head_flops():
    from mercury_onnx.runtime.bench_setup import graph_flops, setup_from_name

    flops = {p: graph_flops(setup_from_name("deit_base_patch16_224", [0.25], prune_point=p))[("head", 49)]
             for p in ("block", "attn")}
    assert flops["attn"] / flops["block"] == pytest.approx(0.570, abs=0.002)   # 1.79 / 3.14 GFLOP (proxy width 64)


def test_checkpoint_refuses_the_other_prune_point(ref, tmp_path):
    from mercury_onnx.export import export_model

    models, _, images = ref
    block = [build_mercury(MercuryConfig(**{**m.cfg.to_dict(), "prune_point": "block"}), m.backbone) for m in models]
    save_mercury(tmp_path / "blk", block)
    save_mercury(tmp_path / "att", models)
    with pytest.raises(ConfigError, match="calibrated with prune_point='block'.*--prune-point attn"):
        load_mercury(tmp_path / "blk.json", prune_point="attn")
    with pytest.raises(ConfigError, match="calibrated with prune_point='attn'"):
        load_mercury(tmp_path / "att.json", prune_point="block")
    with pytest.raises(ConfigError, match="calibrated with prune_point='block'"):
        export_model(tmp_path / "blk.json", tmp_path / "out", [0.5], model_kw={"prune_point": "attn"}, log=None)
    assert not (tmp_path / "out").exists()
    loaded = load_mercury(tmp_path / "att.json")
    assert [m.cfg.prune_point for m in loaded] == ["attn", "attn"]
    assert loaded[0].score_proxy is loaded[1].score_proxy and bool(loaded[0].score_proxy.fitted)
    assert torch.equal(loaded[0].score_proxy.a, models[0].score_proxy.a)
    with torch.no_grad():
        assert torch.allclose(loaded[1](images[:4]), models[1](images[:4]), atol=1e-5)
    # a block checkpoint of this backbone carries no proxy; an attn checkpoint written before the
    # proxy existed (no score_proxy_rank in its JSON) loads without one and scores the stream as is
    from safetensors.torch import load_file
    assert not any(".score_proxy." in k for k in load_file(str(tmp_path / "blk.safetensors")))
    assert load_mercury(tmp_path / "blk.json")[0].score_proxy is None
    save_mercury(tmp_path / "old", [build_mercury(MercuryConfig(**{**models[0].cfg.to_dict(), "score_proxy_rank": 0}),
                                                  create_backbone(models[0].cfg))])
    meta = json.loads((tmp_path / "old.json").read_text())
    del meta["config"]["score_proxy_rank"]
    (tmp_path / "old.json").write_text(json.dumps(meta))
    old = load_mercury(tmp_path / "old.json")[0]
    assert old.cfg.score_proxy_rank == 0 and old.score_proxy is None
    # one written before the gelu kind (no score_proxy_kind in its JSON) has a linear proxy
    lin = build_mercury(MercuryConfig(**{**models[0].cfg.to_dict(), "score_proxy_kind": "linear"}),
                        create_backbone(models[0].cfg))
    assert not hasattr(lin.score_proxy, "a0")
    lin.score_proxy.b.normal_(generator=torch.Generator().manual_seed(0))
    save_mercury(tmp_path / "lin", [lin])
    meta = json.loads((tmp_path / "lin.json").read_text())
    del meta["config"]["score_proxy_kind"]
    (tmp_path / "lin.json").write_text(json.dumps(meta))
    old_lin = load_mercury(tmp_path / "lin.json")[0]
    assert old_lin.score_proxy.kind == "linear" and torch.equal(old_lin.score_proxy.b, lin.score_proxy.b)
    with pytest.raises(ConfigError, match="score_proxy_kind=gelu"):   # one backbone, one proxy
        build_mercury(MercuryConfig(**{**lin.cfg.to_dict(), "score_proxy_kind": "gelu"}), lin.backbone)
    with pytest.raises(ConfigError, match="unknown prune_point 'mlp'"):
        build_mercury(MercuryConfig(**{**models[0].cfg.to_dict(), "prune_point": "mlp"}), models[0].backbone)


def test_calibration_teacher_is_the_vanilla_model(ref, cifar_test):
    """run_prefix's teacher continues the post-attention stream through block 1's MLP."""
    from mercury_onnx.calib.calibrate import run_prefix
    from mercury_onnx.calib.data import load_image_set, preprocess_for

    models, vanilla, _ = ref
    m = models[1]
    ds, _ = load_image_set(cifar_test, preprocess_for(m), m.cfg.classes, count=16, seed=0, progress=False)
    pre = run_prefix(m, ds, progress=False)
    images, _ = next(iter(ds.batches(16)))
    with torch.no_grad():
        assert torch.allclose(pre.teacher, vanilla(images), atol=1e-4)


def test_info_prints_the_head_flops_of_both_prune_points():
    from typer.testing import CliRunner

    from mercury_onnx.cli import app

    r = CliRunner().invoke(app, ["info", "--model", "deit_tiny_patch16_224", "-r", "0.25"])
    assert r.exit_code == 0, r.output
    assert "head FLOPs     0.2621 G (prune point block)" in r.output
    assert "0.1850 G with prune point attn (0.706x)" in r.output   # 0.1753 G + the score proxy's 0.0097 (width 64)
    r = CliRunner().invoke(app, ["info", "--model", "deit_tiny_patch16_224", "--prune-point", "mlp"])
    assert r.exit_code != 0 and "--prune-point 'mlp'" in r.output


def test_export_attn_with_int8_and_tok8_heads(ref_json, cifar_test, tmp_path):
    """The exporter's whole path for prune point attn: int8 (QDQ) quantisation of a head whose
    MLP runs after the GatherND, the int8-token head, validation against torch on real images,
    and the manifest's prune_point."""
    from mercury_onnx.export import export_model

    out = export_model(ref_json, tmp_path / "exp", [0.25], int8_head=True, token_dtypes=["int8"],
                       calib_images=16, int8_select_images=16, validate_data=cifar_test, validate_images=16,
                       model_kw={"prune_point": "attn"}, log=None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["prune_point"] == "attn" and m["validation"]["passed"]
    v = m["variants"][0]
    assert v["head_int8"] and v["head_tok8"]
    assert m["validation"]["identical_index_rows"]["head_k16_tok8.onnx.indices"] == 1.0
