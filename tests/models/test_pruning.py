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


def _distinctness64(x: torch.Tensor) -> torch.Tensor:
    """Eq. 11 from the definition, float64: 1 - mean_{j != i} cos(x_i, x_j) over patches x (B, N, D)."""
    x = x.double()
    n = x.shape[1]
    cos = torch.tensor([[[torch.dot(a, c) / (a.norm() * c.norm()) for c in row] for a in row] for row in x],
                       dtype=torch.float64)                            # (B, N, N), pair by pair
    return 1 - (cos.sum(-1) - cos.diagonal(dim1=1, dim2=2)) / (n - 1)


def test_score_variants_on_a_hand_case():
    """Patches e1, 2 e1, 3 e2, -e1 (cosines 1, 0, -1, known by hand) behind two prefix tokens
    that must take no part: d_i = 1 - mean cosine to the other three patches."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([torch.tensor([5.0, 5.0]), torch.tensor([-3.0, 7.0]), e1, 2 * e1, 3 * e2, -e1])[None]
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    d = torch.tensor([[1 - (1 + 0 - 1) / 3, 1 - (1 + 0 - 1) / 3, 1 - (0 + 0 + 0) / 3, 1 - (-1 - 1 + 0) / 3]])
    assert torch.allclose(P.distinctness(x, skip=2), d)
    assert torch.allclose(P.semantic_score(x, a, "similarity", skip=2), d)
    assert torch.allclose(P.semantic_score(x, a, skip=2), d)                      # the default
    product = torch.tensor([[0.1, 0.2, 0.3, 0.4 * 5 / 3]])
    assert torch.allclose(P.semantic_score(x, a, "product", skip=2), product)
    assert torch.allclose(P.semantic_score(x, a, "mercury", skip=2), product)     # the old name
    assert torch.equal(P.semantic_score(x, a, "attention", skip=2), a)
    with pytest.raises(ValueError, match="unknown score"):
        P.semantic_score(x, a, "sum")


@pytest.mark.parametrize("skip", [0, 1, 2])
def test_scores_match_a_float64_reference(skip):
    g = torch.Generator().manual_seed(skip)
    x, a = torch.randn(2, skip + 9, 6, generator=g), torch.rand(2, 9, generator=g)
    x[:, :skip] *= 100                                                  # prefix tokens unlike the patches
    d = _distinctness64(x[:, skip:])
    assert torch.allclose(P.semantic_score(x, a, "similarity", skip).double(), d, atol=1e-6)
    assert torch.allclose(P.semantic_score(x, a, "product", skip).double(), a.double() * d, atol=1e-6)
    # what the head ranks: the prefix rows (any value: always kept), then lower = keep
    for score, s in (("similarity", d), ("product", a.double() * d)):
        cost = P.selection_cost(x, a, score, prefix=skip)[..., 0]
        assert cost.shape == (2, skip + 9)
        assert torch.equal(cost[:, skip:].argsort(dim=-1, stable=True), (-s).argsort(dim=-1, stable=True))


def test_regional_checks_its_arguments():
    """Plain Python checks on static sizes: they raise while tracing, and cost the graph nothing."""
    scores = torch.rand(1, 64)
    with pytest.raises(ValueError, match="K=15 must be in 16..64: each of the 16 subregions"):
        P.regional_select(scores, 15, 8, 2)
    with pytest.raises(ValueError, match="region size 3 does not divide the 8x8 token grid"):
        P.regional_select(scores, 32, 8, 3)
    with pytest.raises(ValueError, match="K=65 must be in 16..64"):
        P.regional_select(scores, 65, 8, 2)
    with pytest.raises(ValueError, match="63 patch scores for a 8x8 grid"):
        P.regional_select(scores[:, :63], 32, 8, 2)
    with pytest.raises(ValueError, match="K=3 must be in 4..16"):
        P.regional_rows(torch.rand(1, 2 + 16, 1), 3, 4, 2, prefix=2)


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_regional_rows_keep_every_prefix_row_first(prefix):
    """Whatever their cost (here the worst), the prefix rows come first; the patch rows are the
    selection regional_select makes on the same costs."""
    g = torch.Generator().manual_seed(prefix)
    cost = torch.rand(3, prefix + 64, 1, generator=g)
    cost[:, :prefix] = 10.0
    rows = P.regional_rows(cost, 20, 8, 2, prefix=prefix)
    assert rows.shape == (3, prefix + 20, 1)
    assert torch.equal(rows[:, :prefix, 0], torch.arange(prefix).expand(3, prefix))
    assert torch.equal(rows[:, prefix:, 0] - prefix, P.regional_select(-cost[:, prefix:, 0], 20, 8, 2))
    x = torch.randn(3, prefix + 64, 4, generator=g)
    idx = rows[:, prefix:, 0] - prefix
    assert torch.equal(P.gather_tokens(x, idx, prefix), P.batch_gather(x, rows))


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
