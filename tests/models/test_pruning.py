import pytest
import torch
from hypothesis import given, settings, strategies as st

from mercury_onnx.models import pruning as P


@settings(max_examples=60, deadline=None)
@given(grid_region=st.sampled_from([(8, 2), (14, 2), (8, 4), (14, 7), (6, 3)]),
       frac=st.floats(0.0, 1.0), batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_every_subregion_keeps_a_token(grid_region, frac, batch, seed):
    grid, region = grid_region
    n, regions = grid * grid, (grid // region) ** 2
    k = regions + int(frac * (n - regions))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=g)
    if seed % 3 == 0:   # ties and flat scores must not break the guarantee
        scores = torch.round(scores)
    idx = P.regional_select(scores, k, grid, region)
    assert idx.shape == (batch, k)
    for row in idx:
        assert torch.equal(row, torch.sort(row).values)
        assert len(set(row.tolist())) == k
        ys, xs = row // grid, row % grid
        region_ids = set(((ys // region) * (grid // region) + xs // region).tolist())
        assert region_ids == set(range(regions))


def test_regional_keeps_region_winners_then_global_top():
    grid, region, k = 4, 2, 6
    scores = torch.zeros(1, 16)
    # region 0 (top-left) holds the 4 best tokens overall; other regions have one weak winner each
    scores[0, [0, 1, 4, 5]] = torch.tensor([10.0, 9.0, 8.0, 7.0])
    scores[0, 2], scores[0, 8], scores[0, 10] = 1.0, 2.0, 3.0
    idx = P.regional_select(scores, k, grid, region)[0].tolist()
    # winners: 0, 2, 8, 10 ; then the top 2 of the rest: 1 and 4
    assert idx == [0, 1, 2, 4, 8, 10]
    # plain top-k would have taken all of region 0 and missed regions
    assert P.topk_select(scores, k)[0].tolist() == [0, 1, 4, 5, 8, 10]


def test_distinctness_matches_full_similarity_matrix():
    x = torch.randn(2, 10, 7)
    u = torch.nn.functional.normalize(x, dim=-1)
    sim = u @ u.transpose(1, 2)
    expected = 1 - (sim.sum(-1) - sim.diagonal(dim1=1, dim2=2)) / 9
    assert torch.allclose(P.distinctness(x), expected, atol=1e-6)


def test_distinctness_leaves_the_cls_out():
    x = torch.randn(2, 17, 8)
    x[:, 0] *= 100                                   # a CLS unlike the patches changes nothing
    assert torch.allclose(P.distinctness(x, skip=1), P.distinctness(x[:, 1:]), atol=1e-6)
    a = torch.rand(2, 16)
    assert torch.allclose(P.semantic_score(x, a, "product", skip=1), a * P.distinctness(x[:, 1:]), atol=1e-6)
    assert torch.allclose(P.semantic_score(x, a, skip=1), P.distinctness(x[:, 1:]), atol=1e-6)   # default


def test_score_variants():
    x, a = torch.randn(2, 16, 8), torch.rand(2, 16)
    assert torch.equal(P.semantic_score(x, a, "attention"), a)
    assert torch.allclose(P.semantic_score(x, a, "similarity"), P.distinctness(x))
    assert torch.allclose(P.semantic_score(x, a, "product"), a * P.distinctness(x))
    assert torch.equal(P.semantic_score(x, a, "mercury"), P.semantic_score(x, a, "product"))   # old name
    with pytest.raises(ValueError, match="unknown score"):
        P.semantic_score(x, a, "sum")


def test_uniform_and_random_are_exact_and_sorted():
    for k in (1, 16, 49, 100, 196):
        u = P.uniform_select(2, 196, k)
        r = P.random_select(2, 196, k, torch.Generator().manual_seed(0))
        for idx in (u, r):
            assert idx.shape == (2, k)
            for row in idx:
                assert len(set(row.tolist())) == k and torch.equal(row, torch.sort(row).values)


def test_janus_schedule_decays_to_k():
    s = P.janus_schedule(196, 49, 3)
    assert s[-1] == 49 and s[0] > s[1] > s[2]
    assert (196 - s[0]) > (s[0] - s[1]) > (s[1] - s[2])   # fewer removed each step
