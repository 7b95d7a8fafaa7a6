"""Token scoring and selection: Mercury's regional pruning (Algorithm 1) and the baselines.

Everything here maps to static-shape ONNX ops (MatMul, ReduceSum, ArgMax, TopK, Equal, Where,
Gather, GatherND). There is no NonZero and no boolean indexing, so K is a constant of the graph.

The formulations are shaped for the exported head. There every small op is one ORT kernel
with a fixed cost, paid cold right after the block's large matmuls, so the pruning is written
in few ops (about 27 after the block, down from about 45): the distinctness without a
normalised copy of the tokens (two MatMuls), the subregions as constant index tables (one
Gather, no reshape/transpose round trip), and the kept tokens as one GatherND (no int64 index
Expand to (B, K, D) + GatherElements). docs/results/export.md has the measurements.

Shapes: B batch, N patch tokens (a g x g grid, N = g*g), D width, K kept patch tokens.
Ties: every selection takes the lower index first among equal scores (the rule of ONNX TopK
and ArgMax), in eager PyTorch too, so torch and the ONNX head pick the same tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import SCORE_ALIASES


# ---------------------------------------------------------------- scores (Eq. 11, Eq. 12)

def distinctness(tokens: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """1 - mean cosine similarity of each patch token to the other patch tokens (Eq. 11).
    tokens (B, skip+N, D): the first `skip` tokens (the CLS) take no part -> (B, N).

    With x^ = x / |x| and S = sum_j x^_j over the N patches, mean_{j != i} cos(x_i, x_j) =
    (x^_i . S - 1) / (N - 1), so this costs O(N D) instead of the O(N^2 D) of the similarity
    matrix. It is computed as 1 + c - x_i . (c S) / |x_i| with c = 1 / (N - 1), shaped for the
    exported head, where each op is one ORT kernel: no normalised copy of the tokens, S and the
    dot products are two MatMuls over reshaped (not transposed) vectors, and |x| is a Mul +
    ReduceSum + Sqrt (ORT's ReduceL2 takes about twice as long).
    """
    _, t, d = tokens.shape
    c = 1.0 / max(t - skip - 1, 1)
    norms = (tokens * tokens).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)   # (B, T, 1) |x|
    weight = (torch.arange(t, device=tokens.device) >= skip).to(tokens.dtype).unsqueeze(-1) * c   # (T, 1)
    total = (weight / norms).reshape(-1, 1, t) @ tokens                    # (B, 1, D)  c S
    sims = (tokens @ total.reshape(-1, d, 1)) / norms                      # (B, T, 1)  x^_i . c S
    return (1.0 + c) - sims.reshape(-1, t)[:, skip:]                       # (B, N)


def semantic_score(tokens: torch.Tensor, cls_attn: torch.Tensor, variant: str = "similarity",
                   skip: int = 0) -> torch.Tensor:
    """Eq. 12. tokens (B, skip+N, D) (the first `skip` of them are not patches, as the CLS),
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
    Without attention in the score the head also skips 3 ONNX kernels.
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


# ---------------------------------------------------------------- selection

def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k largest scores, ties to the lower index.

    ONNX TopK defines that tie rule; torch.topk leaves it open (on CPU it does not keep it),
    so eager PyTorch takes the first k of a stable descending sort instead.
    """
    if torch.onnx.is_in_onnx_export():
        return scores.topk(k, dim=-1, sorted=False).indices   # order: sorted by the caller
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def sort_indices(idx: torch.Tensor) -> torch.Tensor:
    """Ascending order (exports as a TopK, no Sort op needed)."""
    return torch.sort(idx, dim=-1).values


def region_order(grid: int, region: int) -> torch.Tensor:
    """(l^2, r^2) patch indices: row j lists subregion j's tokens in raster order (Eq. 13-14).
    Subregions are numbered in raster order over the l x l grid of subregions."""
    l = grid // region
    ids = torch.arange(grid * grid).reshape(l, region, l, region).permute(0, 2, 1, 3)
    return ids.reshape(l * l, region * region)


def regional_select(scores: torch.Tensor, k: int, grid: int, region: int) -> torch.Tensor:
    """Eq. 17: every subregion's winner, plus the top (K - l^2) of the rest. Returns (B, K)
    sorted patch indices. Eq. 18 (the pruned set) is the complement and is never materialised.

    Winners are lifted to +inf so one TopK takes all l^2 of them and then the best of the rest
    (lower index first on equal scores). In ONNX: Gather, ArgMax, Gather, Equal, Where, TopK,
    TopK (ascending order); the subregion layout lives in constant index tables.
    """
    order = region_order(grid, region).to(scores.device)                # (l^2, r^2)
    win = scores[:, order].argmax(dim=-1)                                # (B, l^2)  Eq. 15: first best slot
    place = torch.argsort(order.flatten())                              # (N,) each patch's place in `order`
    region_of, slot_of = place // (region * region), place % (region * region)   # subregion, slot in it
    is_winner = win[:, region_of] == slot_of                             # (B, N)  Eq. 16
    key = torch.where(is_winner, float("inf"), scores)                   # (B, N)
    return sort_indices(top_k(key, k))


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
    """x (B, T, D), rows (B, R) -> x[b, rows[b]] (B, R, D). Only used while exporting: it
    becomes one GatherND (batch_dims=1) instead of torch.gather's Expand of the int64 index
    to (B, R, D) + GatherElements."""

    @staticmethod
    def forward(ctx, x, rows):
        return _gather_rows(x, rows)

    @staticmethod
    def symbolic(g, x, rows):   # GatherND's batch_dims needs opset >= 12
        if g.opset < 13:        # Unsqueeze took its axes as an attribute
            index = g.op("Unsqueeze", rows, axes_i=[2])
        else:
            index = g.op("Unsqueeze", rows, g.op("Constant", value_t=torch.tensor([2], dtype=torch.long)))
        return g.op("GatherND", x, index, batch_dims_i=1)


def batch_gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), rows (B, R) -> x[b, rows[b]] (B, R, D); one GatherND in ONNX."""
    if torch.onnx.is_in_onnx_export():
        return _BatchGather.apply(x, rows)
    return _gather_rows(x, rows)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, 1+N, D), idx (B, K) patch indices -> (B, 1+K, D), CLS first."""
    return batch_gather(x, F.pad(idx + 1, (1, 0)))                      # rows (B, 1+K): CLS = row 0


def fuse_pruned(x: torch.Tensor, idx: torch.Tensor, cls_attn: torch.Tensor) -> torch.Tensor:
    """EViT: the pruned tokens, averaged with their CLS-attention weights -> (B, 1, D)."""
    keep = torch.zeros_like(cls_attn).scatter(1, idx, 1.0)              # (B, N)
    w = cls_attn * (1.0 - keep)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return (w.unsqueeze(-1) * x[:, 1:]).sum(1, keepdim=True)


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
