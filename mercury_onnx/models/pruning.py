"""Token scoring and selection: Mercury's regional pruning (Algorithm 1) and the baselines.

Everything here maps to static-shape ONNX ops (MatMul, ReduceMean, ArgMax, TopK, Equal,
Gather). There is no NonZero and no boolean indexing, so K is a constant of the graph.

Shapes: B batch, N patch tokens (a g x g grid, N = g*g), D width, K kept patch tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- scores (Eq. 11, Eq. 12)

def distinctness(patches: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity of each patch token to the other patch tokens (Eq. 11).

    mean_{j != i} cos(x_i, x_j) = (x^_i . sum_j x^_j - 1) / (N - 1) with x^ = x / |x|, so this
    costs O(N D) instead of the O(N^2 D) of the full similarity matrix: it matters on a Pi.
    """
    n = patches.shape[1]
    unit = F.normalize(patches, dim=-1)                               # (B, N, D)
    total = unit.sum(dim=1, keepdim=True)                             # (B, 1, D)
    mean_sim = ((unit * total).sum(-1) - 1.0) / max(n - 1, 1)         # (B, N)
    return 1.0 - mean_sim


def semantic_score(patches: torch.Tensor, cls_attn: torch.Tensor, variant: str = "mercury") -> torch.Tensor:
    """Eq. 12. patches (B, N, D), cls_attn (B, N) -> score (B, N), higher = more worth sending.

    mercury:    s_i = a_i * d_i   (a: CLS attention averaged over heads, d: distinctness)
    attention:  s_i = a_i
    similarity: s_i = d_i

    Why a product: a token should be sent when the model looks at it (a) AND the cloud could
    not guess it from the others (d). A sum would need a tuned weight because a ~ 1/N while
    d ~ 1; the product is scale-free in both, and keeps the ranking of either factor when the
    other is flat.
    """
    if variant == "attention":
        return cls_attn
    d = distinctness(patches)
    if variant == "similarity":
        return d
    return cls_attn * d


# ---------------------------------------------------------------- selection

def sort_indices(idx: torch.Tensor) -> torch.Tensor:
    """Ascending order (exports as a TopK, no Sort op needed)."""
    return torch.sort(idx, dim=-1).values


def region_winner_mask(scores: torch.Tensor, grid: int, region: int) -> torch.Tensor:
    """Eq. 13-16: cut the g x g grid into l x l subregions of region x region tokens and mark
    each subregion's best token. scores (B, N) -> mask (B, N) float, exactly l^2 ones per row."""
    b = scores.shape[0]
    l = grid // region
    s = scores.reshape(b, l, region, l, region).permute(0, 1, 3, 2, 4)   # (B, l, l, r, r)
    s = s.reshape(b, l * l, region * region)                             # (B, l^2, r^2)
    win = s.argmax(dim=-1, keepdim=True)                                 # (B, l^2, 1)  Eq. 15
    slots = torch.arange(region * region, device=scores.device)
    onehot = (win == slots).to(scores.dtype)                             # (B, l^2, r^2)
    onehot = onehot.reshape(b, l, l, region, region).permute(0, 1, 3, 2, 4)
    return onehot.reshape(b, grid * grid)                                # (B, N)  Eq. 16


def regional_select(scores: torch.Tensor, k: int, grid: int, region: int) -> torch.Tensor:
    """Eq. 17: every subregion's winner, plus the top (K - l^2) of the rest. Returns (B, K)
    sorted patch indices. Eq. 18 (the pruned set) is the complement and is never materialised.

    Winners are lifted above every other score (shift to >= 0, add max + 1) so one TopK picks
    all l^2 winners first and then the best of the rest.
    """
    mask = region_winner_mask(scores, grid, region)
    key = scores - scores.min(dim=-1, keepdim=True).values               # (B, N) >= 0
    key = key + mask * (key.max(dim=-1, keepdim=True).values + 1.0)
    return sort_indices(key.topk(k, dim=-1).indices)


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    return sort_indices(scores.topk(k, dim=-1).indices)


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


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, 1+N, D), idx (B, K) patch indices -> (B, 1+K, D), CLS first."""
    d = x.shape[-1]
    kept = torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, d))
    return torch.cat([x[:, :1], kept], dim=1)


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
