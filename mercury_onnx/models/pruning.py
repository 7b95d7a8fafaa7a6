"""Token scoring and selection: Mercury's regional pruning (Algorithm 1) and the baselines.

Everything here maps to static-shape ONNX ops (LpNormalization, MatMul, Gather, ArgMin,
Equal, Where, TopK, GatherND). There is no NonZero and no boolean indexing, so K is a constant
of the graph.

The formulations are shaped for the exported head. There every small op is one ORT kernel that
runs cold right after the block's large matmuls, so the default pruning is as few kernels as
possible (15 after the block): the similarity as a normalised copy and two MatMuls, ranked as
it is (lower = more distinct, no Sub, no Slice of the CLS); the subregions as constant index
tables over the P+N token rows, with each prefix token (the CLS, and a distilled DeiT's
distillation token or a ViT's registers: timm's `num_prefix_tokens`) as one more subregion
that always wins, so the TopK's rows are the GatherND index as they are (no Add, Pad,
Unsqueeze). What each kernel costs, and the earlier formulations measured against this one:
git history of docs/results/export.md
(benchmarks/reproduce.sh export regenerates the current figures).

Shapes: B batch, P prefix tokens, N patch tokens (a g x g grid, N = g*g), D width, K kept
patch tokens.
Ties: every selection takes the lower index first among equal scores (the rule of ONNX TopK
and ArgMin/ArgMax), in eager PyTorch too, so torch and the ONNX head pick the same tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import SCORE_ALIASES


# ---------------------------------------------------------------- scores (Eq. 11, Eq. 12)

class _LpNormalize(torch.autograd.Function):
    """x / |x| over the last axis, zero rows stay zero. Only used while exporting: it becomes
    one LpNormalization, where F.normalize exports as ReduceL2 + Clip + Expand + Div."""

    @staticmethod
    def forward(ctx, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @staticmethod
    def symbolic(g, x):
        return g.op("LpNormalization", x, axis_i=-1, p_i=2)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    if torch.onnx.is_in_onnx_export():
        return _LpNormalize.apply(x)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def similarity_cost(tokens: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """Mean cosine similarity of each token to the patch tokens, up to a constant: (B, T, D) ->
    (B, T, 1). The first `skip` tokens (the prefix tokens: CLS, ...) are left out of the sum. Lower = more distinct:
    distinctness d_i = 1 + c - cost_i (Eq. 11).

    With x^ = x / |x| and S = sum_j x^_j over the N patches, mean_{j != i} cos(x_i, x_j) =
    (x^_i . S - 1) / (N - 1), so this costs O(N D) instead of the O(N^2 D) of the similarity
    matrix: cost_i = x^_i . (c S), c = 1 / (N - 1). In the exported head that is 4 kernels:
    LpNormalization, MatMul by a constant (1, T) weight (c, 0 for the prefix tokens), Reshape, MatMul.
    """
    t, d = tokens.shape[1:]
    c = 1.0 / max(t - skip - 1, 1)
    xn = _normalize(tokens)                                                  # (B, T, D)
    weight = ((torch.arange(t, device=tokens.device) >= skip).to(tokens.dtype) * c).reshape(1, t)
    total = weight @ xn                                                      # (B, 1, D)  c S
    return xn @ total.reshape(-1, d, 1)                                      # (B, T, 1)


def distinctness(tokens: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """1 - mean cosine similarity of each patch token to the other patch tokens (Eq. 11).
    tokens (B, skip+N, D): the first `skip` tokens (the prefix tokens) take no part -> (B, N)."""
    c = 1.0 / max(tokens.shape[1] - skip - 1, 1)
    return (1.0 + c) - similarity_cost(tokens, skip)[:, skip:, 0]


def semantic_score(tokens: torch.Tensor, cls_attn: torch.Tensor, variant: str = "similarity",
                   skip: int = 0) -> torch.Tensor:
    """Eq. 12. tokens (B, skip+N, D) (the first `skip` of them are not patches: the prefix tokens),
    cls_attn (B, N) -> score (B, N), higher = more worth sending.

    similarity: s_i = d_i        (d: distinctness, Eq. 11)  -- the default
    product:    s_i = a_i * d_i  (a: CLS attention averaged over heads; "mercury" = old name)
    attention:  s_i = a_i

    The product reads as the paper's combination: send a token when the model looks at it (a)
    AND the cloud could not guess it from the others (d); it is scale-free, where a sum would
    need a tuned weight (a ~ 1/N, d ~ 1). Measured on the reference model (docs/results/
    calib.md), distinctness alone selects better tokens for the reconstruction: with
    meta-local calibrated for each score on the same 5,000 images, KL to the unpruned model on
    a held-out train slice was 0.021 vs 0.036 at K = 32 and 0.071 vs 0.086 at K = 16, and
    a^(1/4) * d fell in between. So `similarity` is the default and the product an ablation.
    """
    variant = SCORE_ALIASES.get(variant, variant)
    if variant == "attention":
        return cls_attn
    d = distinctness(tokens, skip)
    if variant == "similarity":
        return d
    if variant == "product":
        return cls_attn * d
    raise ValueError(f"unknown score variant {variant!r}")


def selection_cost(x: torch.Tensor, cls_attn: torch.Tensor | None, variant: str = "similarity",
                   prefix: int = 1) -> torch.Tensor:
    """What regional_rows ranks: x (B, P+N, D), cls_attn (B, N) -> (B, P+N, 1), lower = keep;
    rows 0..P-1 (the prefix tokens: CLS, distillation, registers) are always kept, whatever
    their value. For the default score this is the similarity cost itself (no Sub to turn it
    into d, no Slice to drop the prefix), and cls_attn is not read (it may be None)."""
    if SCORE_ALIASES.get(variant, variant) == "similarity":
        return similarity_cost(x, skip=prefix)
    return F.pad(-semantic_score(x, cls_attn, variant, skip=prefix), (prefix, 0)).unsqueeze(-1)


class ScoreProxy(torch.nn.Module):
    """What the prune point "attn" scores instead of the post-attention stream x: x plus a
    width-r stand-in for the MLP half it has not run yet, a small MLP of its own (kind "gelu")
    or a rank-r linear map (kind "linear", checkpoints before the gelu kind):

        x + gelu(norm2(x) A + a0) B + c     A (D, r), a0 (r,), B (r, D), c (D,)
        x + norm2(x) A B + c                (linear)

    one LayerNorm and two thin MatMuls, so the selection sees roughly the tokens that `block`
    would score (x + mlp(norm2(x))) for 4 (P+N) D r FLOPs instead of the MLP's 16 (P+N) D^2.
    All zeros (as built) it is the plain stream, x; `fit_score_proxy` fits it on calibration
    tokens. It lives on the pruning block (`block.score_proxy`), so every Mercury wrapper on
    one backbone shares it and it is saved with the backbone's tensors."""

    def __init__(self, dim: int, rank: int, kind: str = "gelu"):
        super().__init__()
        self.kind = kind
        self.register_buffer("a", torch.zeros(dim, rank))
        if kind == "gelu":
            self.register_buffer("a0", torch.zeros(rank))
        self.register_buffer("b", torch.zeros(rank, dim))
        self.register_buffer("c", torch.zeros(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """norm2(x) (.., D) -> the width-r hidden layer (.., r)."""
        return F.gelu(h @ self.a + self.a0) if self.kind == "gelu" else h @ self.a

    def forward(self, x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        return x + self.hidden(norm(x)) @ self.b + self.c                        # (B, T, D)


@torch.no_grad()
def fit_score_proxy(proxy: ScoreProxy, x: torch.Tensor, norm: torch.nn.Module, mlp: torch.nn.Module,
                    max_rows: int = 65536, ridge: float = 1e-4, seed: int = 0) -> dict:
    """Fit proxy to the MLP half on post-attention tokens x (M, T, D) of calibration images:
    h = norm(x), y = mlp(h). Kind "gelu": least squares by Adam (_fit_gelu_proxy). Kind
    "linear": W = ridge regression of y on h (centred), then its best rank-r
    version for the fitted values (reduced-rank regression: W V_r V_r^T, V_r the top right
    singular vectors of h W). Up to max_rows token rows (seeded). Returns the fraction of
    y's variance the rank-r map explains."""
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) > max_rows:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_rows]]
    h = norm(rows.float())
    y = mlp(h)
    if proxy.kind == "gelu":
        return _fit_gelu_proxy(proxy, h, y, seed)
    h, y = h.double(), y.double()
    mh, my = h.mean(0), y.mean(0)
    h, y = h - mh, y - my                                                        # (M, D)
    g = h.T @ h
    w = torch.linalg.solve(g + ridge * g.diagonal().mean() * torch.eye(len(g), dtype=g.dtype), h.T @ y)
    v = torch.linalg.svd(h @ w, full_matrices=False).Vh[: proxy.rank].T        # (D, r)
    a, b = w @ v, v.T
    proxy.a.copy_(a), proxy.b.copy_(b), proxy.c.copy_(my - mh @ a @ b)
    proxy.fitted.fill_(True)
    explained = 1 - ((h @ a @ b - y) ** 2).sum() / (y ** 2).sum()
    return {"rank": proxy.rank, "kind": "linear", "rows": len(rows), "explained": round(float(explained), 4)}


def _fit_gelu_proxy(proxy: ScoreProxy, h: torch.Tensor, y: torch.Tensor, seed: int,
                    steps: int = 1500, batch: int = 4096, lr: float = 3e-3) -> dict:
    """Least squares of y (M, D) on gelu(h A + a0) B + c by Adam on batches of rows (seeded):
    no closed form with the GELU. From A ~ N(0, 1/D), a0 = B = 0, c = mean(y)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(proxy.a.shape, generator=g) / h.shape[1] ** 0.5).requires_grad_()
    a0, b = torch.zeros_like(proxy.a0).requires_grad_(), torch.zeros_like(proxy.b).requires_grad_()
    c = y.mean(0).clone().requires_grad_()
    opt = torch.optim.Adam([a, a0, b, c], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            i = torch.randint(0, len(h), (min(batch, len(h)),), generator=g)
            loss = ((F.gelu(h[i] @ a + a0) @ b + c - y[i]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    proxy.a.copy_(a), proxy.a0.copy_(a0), proxy.b.copy_(b), proxy.c.copy_(c)
    proxy.fitted.fill_(True)
    explained = 1 - ((proxy.hidden(h) @ proxy.b + proxy.c - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    return {"rank": proxy.rank, "kind": "gelu", "rows": len(h), "explained": round(float(explained), 4)}


# ---------------------------------------------------------------- selection

def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k largest scores, ties to the lower index.

    ONNX TopK defines that tie rule; torch.topk leaves it open (on CPU it does not keep it),
    so eager PyTorch takes the first k of a stable descending sort instead.
    """
    if torch.onnx.is_in_onnx_export():
        return scores.topk(k, dim=-1, sorted=False).indices   # order: sorted by the caller
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def bottom_k(cost: torch.Tensor, k: int) -> torch.Tensor:
    """Along dim 1: indices of the k lowest values, ties to the lower index (ONNX TopK's rule;
    eager takes the first k of a stable ascending sort). (B, T, 1) -> (B, k, 1)."""
    if torch.onnx.is_in_onnx_export():
        return cost.topk(k, dim=1, largest=False, sorted=False).indices
    return cost.sort(dim=1, stable=True).indices[:, :k]


def sort_indices(idx: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Ascending order (exports as a TopK, no Sort op needed)."""
    return torch.sort(idx, dim=dim).values


def region_order(grid: int, region: int) -> torch.Tensor:
    """(l^2, r^2) patch indices: row j lists subregion j's tokens in raster order (Eq. 13-14).
    Subregions are numbered in raster order over the l x l grid of subregions."""
    l = grid // region
    ids = torch.arange(grid * grid).reshape(l, region, l, region).permute(0, 2, 1, 3)
    return ids.reshape(l * l, region * region)


def check_regions(n: int, k: int, grid: int, region: int) -> None:
    """Algorithm 1's preconditions, on static ints (at trace time, nothing in the graph):
    N = g*g patches, r divides g, and l^2 <= K <= N (every subregion keeps its winner)."""
    if n != grid * grid:
        raise ValueError(f"{n} patch scores for a {grid}x{grid} grid ({grid * grid} patches)")
    if region < 1 or grid % region:
        raise ValueError(f"region size {region} does not divide the {grid}x{grid} token grid; "
                         f"pick a divisor of {grid}")
    regions = (grid // region) ** 2
    if not regions <= k <= n:
        raise ValueError(f"K={k} must be in {regions}..{n}: each of the {regions} subregions (l^2) "
                         f"keeps one token, and there are {n} patches")


def _row_tables(grid: int, region: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constant tables over the P+N token rows (rows 0..P-1 = prefix tokens, row P+p = patch p):
    members (l^2+P, r^2): subregion j's rows, then P more 'subregions', each made of one prefix
    row only (repeated), whose winner is therefore always that prefix token;
    region_of (P+N,), slot_of (P+N, 1): each row's subregion and its slot in it."""
    order = region_order(grid, region)                                  # (l^2, r^2)
    r2, l2 = order.shape[1], order.shape[0]
    members = torch.cat([order + prefix, torch.arange(prefix).unsqueeze(-1).expand(prefix, r2)])
    place = torch.argsort(order.flatten())                              # (N,) each patch's place in `order`
    region_of = torch.cat([l2 + torch.arange(prefix), place // r2])
    slot_of = torch.cat([torch.zeros(prefix, dtype=torch.long), place % r2]).unsqueeze(-1)
    return members, region_of, slot_of


def regional_rows(cost: torch.Tensor, k: int, grid: int, region: int, prefix: int = 1) -> torch.Tensor:
    """Eq. 15-17 on token rows: cost (B, P+N, 1), lower = keep -> rows (B, P+K, 1) ascending:
    0..P-1 (the prefix tokens), then P + the kept patch indices. Every subregion's winner (its
    lowest cost, the first one in raster order on a tie) and the prefix rows are lowered to
    -inf, so one TopK takes them and then the K - l^2 lowest of the rest (lower index first on
    equal costs). Eq. 18 (the pruned set) is the complement and is never materialised.

    Exported: Gather (costs by subregion, a constant index table), ArgMin, Gather (each row's
    winner slot), Equal, Where, TopK, TopK (ascending): 7 kernels, and the rows are the
    GatherND index as they are. Raises ValueError (while tracing, on static sizes) unless r
    divides g and l^2 <= K <= N.
    """
    check_regions(cost.shape[1] - prefix, k, grid, region)
    members, region_of, slot_of = (t.to(cost.device) for t in _row_tables(grid, region, prefix))
    win = cost[:, members].argmin(dim=2)                                 # (B, l^2+P, 1)  Eq. 15
    is_winner = win[:, region_of] == slot_of                             # (B, P+N, 1)  Eq. 16, prefix too
    key = torch.where(is_winner, float("-inf"), cost)                    # (B, P+N, 1)
    return sort_indices(bottom_k(key, k + prefix), dim=1)                # (B, P+K, 1)


def regional_select(scores: torch.Tensor, k: int, grid: int, region: int) -> torch.Tensor:
    """Eq. 17 on patch scores (B, N), higher = keep -> (B, K) sorted patch indices.
    Raises ValueError unless r divides g and l^2 <= K <= N (regional_rows checks)."""
    rows = regional_rows(F.pad(-scores, (1, 0)).unsqueeze(-1), k, grid, region)
    return rows[:, 1:, 0] - 1


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    return sort_indices(top_k(scores, k))


def random_select(batch: int, n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.rand(batch, n, generator=generator)
    return sort_indices(noise.topk(k, dim=-1).indices)


def uniform_select(batch: int, n: int, k: int) -> torch.Tensor:
    """Fixed positions spread evenly over the raster order, the same for every image."""
    idx = torch.linspace(0, n - 1, k).round().long()
    idx = torch.unique(idx)
    if idx.numel() < k:   # rounding collisions: fill with the first unused positions
        rest = torch.tensor([i for i in range(n) if i not in set(idx.tolist())][: k - idx.numel()])
        idx = torch.sort(torch.cat([idx, rest])).values
    return idx.unsqueeze(0).expand(batch, k)


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), rows (B, R) -> x[b, rows[b]] (B, R, D)."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class _BatchGather(torch.autograd.Function):
    """x (B, T, D), rows (B, R, 1) -> x[b, rows[b, :, 0]] (B, R, D). Only used while exporting:
    it becomes one GatherND (batch_dims=1) instead of torch.gather's Expand of the int64 index
    to (B, R, D) + GatherElements."""

    @staticmethod
    def forward(ctx, x, rows):
        return _gather_rows(x, rows[..., 0])

    @staticmethod
    def symbolic(g, x, rows):   # rows (B, R, 1); GatherND's batch_dims needs opset >= 12
        return g.op("GatherND", x, rows, batch_dims_i=1)


def batch_gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), rows (B, R) or (B, R, 1) -> x[b, rows[b]] (B, R, D); one GatherND in ONNX
    (plus an Unsqueeze for (B, R) rows)."""
    if torch.onnx.is_in_onnx_export():
        return _BatchGather.apply(x, rows if rows.dim() == 3 else rows.unsqueeze(-1))
    return _gather_rows(x, rows if rows.dim() == 2 else rows[..., 0])


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """x (B, P+N, D), idx (B, K) patch indices -> (B, P+K, D): the P prefix tokens first."""
    head = torch.arange(prefix, device=idx.device).expand(idx.shape[0], prefix)   # (B, P)
    return batch_gather(x, torch.cat([head, idx + prefix], 1))           # rows (B, P+K)


def fuse_pruned(x: torch.Tensor, idx: torch.Tensor, cls_attn: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """EViT: the pruned tokens, averaged with their CLS-attention weights -> (B, 1, D)."""
    keep = torch.zeros_like(cls_attn).scatter(1, idx, 1.0)              # (B, N)
    w = cls_attn * (1.0 - keep)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return (w.unsqueeze(-1) * x[:, prefix:]).sum(1, keepdim=True)


def janus_schedule(n: int, k: int, steps: int, decay: float = 0.5) -> list[int]:
    """Token counts after each of `steps` pruning blocks, N -> K, removing fewer tokens at each
    step (geometric decay, as Janus' decaying schedule). The last entry is K."""
    if steps <= 1:
        return [k]
    weights = [decay ** i for i in range(steps)]
    total = n - k
    counts, removed = [], 0.0
    for w in weights:
        removed += total * w / sum(weights)
        counts.append(n - int(round(removed)))
    counts[-1] = k
    return counts
