"""The pruning as written for the exported head (mercury_onnx.models.pruning) against a
straightforward reference: the full cosine-similarity matrix in float64 and Algorithm 1 as
plain Python loops. Same indices on real CIFAR-10 images, with ties, in torch and in ORT.

The reference model's backbone is the one the calibrated checkpoints were trained on (only
their meta-parameters differ), so these are the selections those checkpoints saw.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mercury_onnx.export.convert import export_onnx
from mercury_onnx.export.images import load_images
from mercury_onnx.export.validate import session
from mercury_onnx.models import MercuryConfig, build_mercury
from mercury_onnx.models import pruning as P
from mercury_onnx.models.loading import create_backbone

IMAGES = 256


SCORES = ("similarity", "product", "attention")


def reference_scores(x: torch.Tensor, cls_attn: torch.Tensor, score: str = "similarity") -> torch.Tensor:
    """Eq. 11-12 from the definition, in float64: d_i = 1 - mean_{j != i} cos(x_i, x_j), and
    s_i = d_i (similarity, the default), a_i * d_i (product) or a_i (attention)."""
    if score == "attention":
        return cls_attn.double()
    p = x[:, 1:].double()                                              # (B, N, D) patch tokens
    unit = p / p.norm(dim=-1, keepdim=True)
    sim = unit @ unit.transpose(1, 2)                                  # (B, N, N)
    n = p.shape[1]
    mean_sim = (sim.sum(-1) - sim.diagonal(dim1=1, dim2=2)) / (n - 1)
    d = 1 - mean_sim
    return d if score == "similarity" else cls_attn.double() * d


def reference_select(scores: list[float], k: int, grid: int, region: int) -> list[int]:
    """Algorithm 1 by hand: each region x region subregion keeps its best token (the first in
    raster order on ties), then the best K - l^2 of the others (the lower index on ties)."""
    l = grid // region
    winners = []
    for ry in range(l):
        for rx in range(l):
            tokens = [(ry * region + dy) * grid + rx * region + dx for dy in range(region) for dx in range(region)]
            best = tokens[0]
            for t in tokens[1:]:
                if scores[t] > scores[best]:
                    best = t
            winners.append(best)
    rest = sorted((i for i in range(grid * grid) if i not in set(winners)), key=lambda i: (-scores[i], i))
    return sorted(winners + rest[: k - len(winners)])


def reference_rows(scores: torch.Tensor, k: int, grid: int, region: int) -> torch.Tensor:
    return torch.tensor([reference_select(row.tolist(), k, grid, region) for row in scores])


@pytest.fixture(scope="module")
def ref_models(ref_json):
    """{score: [K = 32 model, K = 16 model]} on one backbone."""
    cfg = MercuryConfig.from_checkpoint_json(ref_json, keep_ratio=0.5)
    backbone = create_backbone(cfg)
    return {s: [build_mercury(MercuryConfig(**{**cfg.to_dict(), "keep_ratio": r, "score": s}), backbone)
                for r in (0.5, 0.25)] for s in SCORES}


@pytest.fixture(scope="module")
def real_prefix(ref_models, cifar_test):
    """Real CIFAR-10 test images and the prefix (block 1) outputs and CLS attention on them."""
    m = ref_models["product"][0]
    images, _ = load_images(cifar_test, IMAGES, (32, 32), m.cfg.mean, m.cfg.std)
    images = torch.from_numpy(images)
    with torch.no_grad():
        x, cls_attn = m.forward_prefix(images)
    return images, x, cls_attn.clone()


def tied(scores: torch.Tensor, levels: int) -> torch.Tensor:
    """Real scores rounded to a few levels: many ties inside subregions and at the K-th place."""
    return torch.round(scores / scores.amax(-1, keepdim=True) * levels) / levels


@pytest.mark.parametrize("score", SCORES)
def test_real_images_select_what_the_reference_selects(ref_models, real_prefix, score):
    images, x, cls_attn = real_prefix
    assert MercuryConfig().score == "similarity"                       # the default
    ref = reference_scores(x, cls_attn, score)
    assert torch.allclose(P.semantic_score(x, cls_attn, score, skip=1).double(), ref, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for m in ref_models[score]:                                    # K = 32 and K = 16
            assert m.cfg.score == score
            tokens, idx = m.forward_head(images)
            assert torch.equal(idx, reference_rows(ref, m.keep, m.grid, m.cfg.region_size))
            kept = torch.stack([x[b, [0] + (idx[b] + 1).tolist()] for b in range(len(x))])
            assert torch.equal(tokens, kept)                           # CLS first, then the kept patches


@pytest.mark.parametrize("levels", [3, 12, 0])
@pytest.mark.parametrize("k,region", [(32, 2), (16, 2), (20, 4), (4, 4)])
def test_ties_resolve_as_the_reference_in_torch(real_prefix, levels, k, region):
    _, x, cls_attn = real_prefix
    scores = P.semantic_score(x, cls_attn, skip=1)
    scores = torch.zeros_like(scores) if levels == 0 else tied(scores, levels)   # 0: all equal
    winners = (8 // region) ** 2
    # the ties are real: inside subregions and across the K-th place
    order = P.region_order(8, region)
    assert (scores[:, order] == scores[:, order].amax(-1, keepdim=True)).sum(-1).gt(1).any()
    if k > winners:
        kth = scores.sort(-1, descending=True).values[:, k - winners - 1]
        assert (scores == kth[:, None]).sum(-1).gt(1).float().mean() > 0.5
    assert torch.equal(P.regional_select(scores, k, 8, region), reference_rows(scores, k, 8, region))


class _Select(nn.Module):
    def __init__(self, k: int, region: int):
        super().__init__()
        self.k, self.region = k, region

    def forward(self, scores):
        return P.regional_select(scores, self.k, 8, self.region)


@pytest.mark.parametrize("k,region", [(32, 2), (16, 2), (20, 4)])
def test_ties_resolve_as_the_reference_in_onnx(real_prefix, tmp_path, k, region):
    _, x, cls_attn = real_prefix
    scores = tied(P.semantic_score(x, cls_attn, skip=1), 12)
    scores[0] = 0.0                                                    # and one all-equal row
    path = tmp_path / "select.onnx"
    export_onnx(_Select(k, region), (scores[:2],), path, ["scores"], ["indices"])
    (got,) = session(path).run(None, {"scores": scores.numpy()})
    assert np.array_equal(got, reference_rows(scores, k, 8, region).numpy())


@pytest.mark.parametrize("score", SCORES)
def test_onnx_head_selects_the_same_tokens_on_real_images(ref_models, real_prefix, tmp_path, score):
    from mercury_onnx.export.graphs import HEAD_IO, HeadGraph

    images = real_prefix[0][:64]
    m = ref_models[score][1]                                           # K = 16
    with torch.no_grad():
        tokens, idx = m.forward_head(images)
    assert torch.equal(idx, ref_models["similarity"][1].forward_head(images)[1]) == (score == "similarity")
    model = export_onnx(HeadGraph(m), (images[:2],), tmp_path / "head.onnx", *HEAD_IO)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherND") == 1 and "GatherElements" not in ops       # no int64 index Expand
    got_tokens, got_idx = session(tmp_path / "head.onnx").run(None, {"images": images.numpy()})
    assert np.array_equal(got_idx, idx.numpy())
    assert np.abs(got_tokens - tokens.numpy()).max() < 1e-4


def test_region_checks_raise_while_tracing_and_add_nothing_to_the_graph(tmp_path):
    from mercury_onnx.export.convert import ExportError

    scores = torch.rand(2, 64)
    with pytest.raises(ExportError, match="ValueError: K=15 must be in 16..64"):
        export_onnx(_Select(15, 2), (scores,), tmp_path / "bad.onnx", ["scores"], ["indices"])
    with pytest.raises(ExportError, match="ValueError: region size 3 does not divide"):
        export_onnx(_Select(32, 3), (scores,), tmp_path / "bad.onnx", ["scores"], ["indices"])
    model = export_onnx(_Select(16, 2), (scores,), tmp_path / "ok.onnx", ["scores"], ["indices"])
    ops = sorted(n.op_type for n in model.graph.node)
    assert not set(ops) & {"If", "Loop", "Assert", "Shape", "Size"}, ops    # nothing checked at run time
    assert ops.count("TopK") == 2 and ops.count("ArgMin") == 1
