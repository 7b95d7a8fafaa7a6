"""Cloud-side reconstruction: (B, P+K, D) kept tokens + (B, K) indices -> (B, P+N, D).

P prefix tokens (timm's `num_prefix_tokens`: the CLS, a distilled DeiT's distillation token,
registers) come first, are always received, and pass through as they are.

Received tokens go back to their positions with one scatter (ScatterElements in ONNX, no
FLOPs; meta-local, the default, needs none: see MetaLocal.forward); pruned positions get a
fill. Mercury's fills are learned meta-parameters within the
paper's budget (0.13% of the backbone). The baselines the paper compares against live here
too, behind the same call.

| name      | fill of a pruned position i                               | learned params     |
|-----------|-----------------------------------------------------------|--------------------|
| meta-pos  | U_i V + b  (low-rank per-position meta tokens)            | N r + r D + D      |
| meta-ctx  | b + U_i V + (c A) C,  c = mean received patch token | D + N r + 3 r D    |
| meta-local| n_i + b + U_i V + (n_i A) C,  n_i = nearest received token | D + N r + 3 r D  |
| zero      | pos_embed_i (zero-padding + position embedding)           | 0                  |
| duplicate | the spatially nearest received token                      | 0                  |
| mask      | m + pos_embed_i (one MAE-style mask token)                | D                  |
| generator | a transformer block's output over [received ; mask+pos]   | ~12 D^2 (!)        |
| none      | nothing: the tail runs on the P+K received tokens         | 0                  |

Rank r is the largest that fits the budget unless given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import pruning as P
from .config import ConfigError, meta_budget


def scatter_kept(fill: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor, p: int = 1) -> torch.Tensor:
    """fill (B, N, D) with tokens[:, P:] put at idx; the P prefix tokens prepended -> (B, P+N, D)."""
    d = tokens.shape[-1]
    patches = fill.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), tokens[:, p:])
    return torch.cat([tokens[:, :p], patches], dim=1)


class Reconstruction(nn.Module):
    """Base: subclasses define fill(tokens, idx) -> (B, N, D). `learned` = needs calibration.
    tokens (B, P+K, D): the P prefix tokens, then the K received patch tokens."""

    learned = False
    prefix = 1                                                           # P, set by build_reconstruction

    def __init__(self, num_patches: int, dim: int):
        super().__init__()
        self.num_patches, self.dim = num_patches, dim

    def fill(self, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return scatter_kept(self.fill(tokens, idx), tokens, idx, self.prefix)

    def num_meta_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class NoReconstruction(Reconstruction):
    def forward(self, tokens, idx):
        return tokens


class MetaPos(Reconstruction):
    """Per-position meta tokens, low-rank so N of them fit the 0.13% budget."""

    learned = True

    def __init__(self, num_patches, dim, rank):
        super().__init__(num_patches, dim)
        self.pos_code = nn.Parameter(torch.zeros(num_patches, rank))    # (N, r)
        self.basis = nn.Parameter(torch.randn(rank, dim) * 0.02)        # (r, D)
        self.bias = nn.Parameter(torch.zeros(dim))                       # (D,)

    def fill(self, tokens, idx):
        meta = self.pos_code @ self.basis + self.bias                    # (N, D)
        return meta.unsqueeze(0).expand(tokens.shape[0], -1, -1)


class MetaCtx(MetaPos):
    """Shared mask token + per-position low-rank term + a low-rank map of what was received
    (the mean received patch token), so the fill adapts to the image."""

    def __init__(self, num_patches, dim, rank):
        super().__init__(num_patches, dim, rank)
        self.ctx_down = nn.Parameter(torch.zeros(dim, rank))            # (D, r)
        self.ctx_up = nn.Parameter(torch.randn(rank, dim) * 0.02)       # (r, D)

    def fill(self, tokens, idx):
        ctx = tokens[:, self.prefix:].mean(1)                            # (B, D)
        adapt = (ctx @ self.ctx_down) @ self.ctx_up                      # (B, D)
        meta = self.pos_code @ self.basis + self.bias                    # (N, D)
        return meta.unsqueeze(0) + adapt.unsqueeze(1)                    # (B, N, D)


class MetaLocal(MetaCtx):
    """meta-ctx with a local context: n_i, the spatially nearest received token (as `duplicate`),
    plus b + U_i V + (n_i A) C. Same parameter count as meta-ctx; with b = U = A = 0 it is
    exactly `duplicate`, so calibration starts from copying the neighbour and corrects it."""

    def __init__(self, num_patches, dim, rank, grid):
        super().__init__(num_patches, dim, rank)
        self.nearest = DuplicateNearest(num_patches, dim, grid)         # buffers only, no params

    def fill(self, tokens, idx):
        near = self.nearest.fill(tokens, idx)                            # (B, N, D)
        meta = self.pos_code @ self.basis + self.bias                    # (N, D)
        return near + meta.unsqueeze(0) + (near @ self.ctx_down) @ self.ctx_up

    def forward(self, tokens, idx):
        """scatter_kept(fill(tokens, idx)) without the scatter. A received position's nearest
        received token is itself (distance 0), so one row gather puts every received token in
        place and the neighbour copy everywhere else; the correction is then added only where
        nothing was received (the P prefix tokens included, as rows 0..P-1, with no correction).
        In ONNX: a GatherND and a few (B, N) ops instead of int64 (B, N, D) and (B, K, D) index Expands, GatherElements
        and ScatterElements, whose generic per-element index loops made the DeiT-T tail ~2.5%
        slower than the vanilla tail (git history of docs/results/export.md)."""
        p = self.prefix
        rank = self.nearest.nearest_rank(idx)                            # (B, N) into kept
        x = P.gather_tokens(tokens, rank, p)                             # (B, P+N, D)  prefix first
        received = torch.gather(idx, 1, rank) == self.nearest.positions   # (B, N)
        missing = F.pad(torch.where(received, 0.0, 1.0), (p, 0)).unsqueeze(-1)   # (B, P+N, 1)  prefix: 0
        meta = F.pad(self.pos_code @ self.basis + self.bias, (0, 0, p, 0))   # (P+N, D)
        return x + (meta + (x @ self.ctx_down) @ self.ctx_up) * missing


class ZeroPos(Reconstruction):
    def __init__(self, num_patches, dim, pos_embed):
        super().__init__(num_patches, dim)
        self.register_buffer("pos", pos_embed.detach().clone(), persistent=False)   # (N, D)

    def fill(self, tokens, idx):
        return self.pos.unsqueeze(0).expand(tokens.shape[0], -1, -1)


class MaskToken(ZeroPos):
    learned = True

    def __init__(self, num_patches, dim, pos_embed):
        super().__init__(num_patches, dim, pos_embed)
        self.mask_token = nn.Parameter(torch.zeros(dim))

    def fill(self, tokens, idx):
        return (self.pos + self.mask_token).unsqueeze(0).expand(tokens.shape[0], -1, -1)


class DuplicateNearest(Reconstruction):
    def __init__(self, num_patches, dim, grid):
        super().__init__(num_patches, dim)
        yx = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1)
        yx = yx.reshape(-1, 2).float()
        dist = torch.cdist(yx, yx)                                       # (N, N) symmetric
        dist = dist + torch.arange(num_patches).unsqueeze(-1) * 1e-4     # break ties: lower index
        # dist[j, i]: from position i to candidate j. Rows, so that the K received candidates
        # are one row gather (contiguous in ONNX too), not a column gather + transpose.
        self.register_buffer("dist", dist, persistent=False)
        self.register_buffer("positions", torch.arange(num_patches), persistent=False)

    def nearest_rank(self, idx):
        """idx (B, K) received positions -> (B, N): for every position, which received token
        (its rank in idx) is spatially nearest; a received position's is itself."""
        return self.dist[idx].argmin(1)                                  # (B, K, N) -> (B, N)

    def fill(self, tokens, idx):
        return P.batch_gather(tokens, self.nearest_rank(idx) + self.prefix)   # (B, N, D)


class Generator(MaskToken):
    """One extra transformer block predicts the pruned tokens (the paper's 'generation' baseline;
    ~12 D^2 parameters, far over the meta budget)."""

    def __init__(self, num_patches, dim, pos_embed, num_heads):
        super().__init__(num_patches, dim, pos_embed)
        from timm.models.vision_transformer import Block
        self.block = Block(dim, num_heads)

    def forward(self, tokens, idx):
        x = scatter_kept(super().fill(tokens, idx), tokens, idx, self.prefix)   # (B, P+N, D)
        pred = self.block(x)[:, self.prefix:]                            # (B, N, D)
        return scatter_kept(pred, tokens, idx, self.prefix)


def build_reconstruction(name: str, *, num_patches: int, dim: int, grid: int, num_heads: int,
                         pos_embed: torch.Tensor, backbone_params: int,
                         rank: int | None = None, prefix: int = 1) -> Reconstruction:
    """pos_embed: (N, D), the backbone's position embedding of the patch tokens; prefix: P."""
    if name == "none":
        recon = NoReconstruction(num_patches, dim)
    elif name == "zero":
        recon = ZeroPos(num_patches, dim, pos_embed)
    elif name == "mask":
        recon = MaskToken(num_patches, dim, pos_embed)
    elif name == "duplicate":
        recon = DuplicateNearest(num_patches, dim, grid)
    elif name == "generator":
        recon = Generator(num_patches, dim, pos_embed, num_heads)
    elif name in ("meta-pos", "meta-ctx", "meta-local"):
        budget = meta_budget(backbone_params)
        per_rank = num_patches + dim if name == "meta-pos" else num_patches + 3 * dim
        fixed = dim                                                      # the bias / mask token
        max_rank = (budget - fixed) // per_rank
        rank = max_rank if rank is None else rank
        if rank < 1 or rank > max_rank:
            raise ConfigError(f"{name}: rank {rank} does not fit the meta-parameter budget "
                              f"({budget} params = 0.13% of {backbone_params}); max rank {max_rank}")
        if name == "meta-local":
            recon = MetaLocal(num_patches, dim, rank, grid)
            recon.nearest.prefix = prefix
        else:
            recon = (MetaPos if name == "meta-pos" else MetaCtx)(num_patches, dim, rank)
    else:
        raise ConfigError(f"unknown reconstruction {name!r}")
    recon.prefix = prefix
    return recon
