"""The token codec `DxB`: what the head sends instead of float tokens (issue 13).

Per kept patch token (row of the head's (B, P+K, D) output, P prefix tokens first):

    z = (x - mu_pos[i]) @ V                 (d,)   mu_pos: the calibration mean at position i,
                                                   V: top-d principal directions (D, d)
    q = clip(round((z - lo) / step), 0, 2^b - 1)   per-channel ranges from calibration

and the cloud, which knows each kept token's position i from the indices, inverts it:
x_hat = (lo + q * step) @ V^T + mu_pos[i]. The prefix (CLS) rows have their own mean, basis
and ranges (their statistics differ from the patches'). Everything is a buffer: the head
graph computes Sub, Gather, MatMul, Div, Round, Clip, Cast; the tail Cast, Mul, Add, MatMul.

Why a per-position mean: the position embedding is a per-position offset the cloud knows,
and the per-position mean of the kept tokens contains it plus whatever else is typical of
that position; `mean="global"` (one mean) is kept to measure the difference.

`fit_codec` fits all of it on the head outputs of real calibration images (never test).
Ranges: per channel, the symmetric quantile clip that gives the lowest squared error.
"""
from __future__ import annotations

import re

import torch
from torch import nn

CLIP_QUANTILES = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def parse_codec(name: str) -> tuple[int, int]:
    """'16x4' -> (16 dims, 4 bits). Raises ValueError with the rule on anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(name))
    if not m:
        raise ValueError(f"codec {name!r}: expected DxB, e.g. 16x4 (D principal dims, B bits per channel)")
    d, b = int(m.group(1)), int(m.group(2))
    if d < 1 or not 1 <= b <= 8:
        raise ValueError(f"codec {name!r}: dims must be >= 1 and bits 1..8")
    return d, b


class TokenCodec(nn.Module):
    """PCA + uniform per-channel quantisation of the head's tokens; see the module docstring."""

    def __init__(self, dim: int, num_patches: int, dims: int, bits: int, num_prefix: int = 1):
        super().__init__()
        if dims > dim:
            raise ValueError(f"codec with {dims} dims on tokens of width {dim}")
        self.dims, self.bits, self.num_prefix = dims, bits, num_prefix
        self.levels = 2 ** bits - 1
        self.register_buffer("pos_mean", torch.zeros(num_patches, dim))     # (N, D)
        self.register_buffer("basis", torch.zeros(dim, dims))               # (D, d)
        self.register_buffer("lo", torch.zeros(dims))
        self.register_buffer("step", torch.ones(dims))
        self.register_buffer("prefix_mean", torch.zeros(num_prefix, dim))   # (P, D)
        self.register_buffer("prefix_basis", torch.zeros(dim, dims))
        self.register_buffer("prefix_lo", torch.zeros(dims))
        self.register_buffer("prefix_step", torch.ones(dims))
        self.variance_kept = float("nan")
        self.mean_mode = "position"

    @property
    def name(self) -> str:
        return f"{self.dims}x{self.bits}"

    def _quant(self, z, lo, step, ste: bool = False):
        u = (z - lo) / step
        r = torch.round(u)
        if ste:   # straight-through: forward rounds, backward is the identity
            r = u + (r - u).detach()
        return torch.clamp(r, 0, self.levels)

    def latent(self, tokens: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.num_prefix
        zp = (tokens[:, :p] - self.prefix_mean) @ self.prefix_basis            # (B, P, d)
        zk = (tokens[:, p:] - self.pos_mean[indices]) @ self.basis               # (B, K, d)
        return zp, zk

    def encode(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B, P+K, D) float, (B, K) -> codes (B, P+K, d) uint8."""
        zp, zk = self.latent(tokens, indices)
        q = torch.cat([self._quant(zp, self.prefix_lo, self.prefix_step),
                       self._quant(zk, self.lo, self.step)], 1)
        return q.to(torch.uint8)

    def decode(self, codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """codes (B, P+K, d) uint8 (or float levels), (B, K) -> tokens (B, P+K, D) float32."""
        p = self.num_prefix
        q = codes.to(torch.float32)
        xp = (q[:, :p] * self.prefix_step + self.prefix_lo) @ self.prefix_basis.T + self.prefix_mean
        xk = (q[:, p:] * self.step + self.lo) @ self.basis.T + self.pos_mean[indices]
        return torch.cat([xp, xk], 1)                                           # (B, P+K, D)

    def roundtrip(self, tokens: torch.Tensor, indices: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """decode(encode(tokens)) in float, with straight-through rounding when ste."""
        zp, zk = self.latent(tokens, indices)
        q = torch.cat([self._quant(zp, self.prefix_lo, self.prefix_step, ste),
                       self._quant(zk, self.lo, self.step, ste)], 1)
        return self.decode(q, indices)

    def extra_flops(self, keep: int) -> int:
        """FLOPs per image of one projection (head) or back-projection (tail): 2 (P+K) D d."""
        return 2 * (self.num_prefix + keep) * self.basis.shape[0] * self.dims


def codec_bytes(codec: TokenCodec) -> bytes:
    """Every buffer of the codec (means, bases, ranges) as float32, in name order: what the
    manifest's basis_sha256 and the codec id are computed from."""
    return b"".join(v.detach().to(torch.float32).contiguous().numpy().tobytes()
                    for _, v in sorted(codec.state_dict().items()))


def _pca(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, float]:
    """Top-dims principal directions of centred rows x (M, D) -> (D, dims), variance kept."""
    x = x.double()
    cov = x.T @ x / max(1, len(x) - 1)
    evals, evecs = torch.linalg.eigh(cov)                                       # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    return evecs[:, :dims].float().contiguous(), float(evals[:dims].sum() / evals.sum().clamp_min(1e-30))


def _ranges(z: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of z (M, d): lo and step of the quantile clip with the lowest MSE."""
    zs = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:200_000]]
    best_err, best = None, None
    for a in CLIP_QUANTILES:
        lo = torch.quantile(zs, a, dim=0) if a else zs.min(0).values
        hi = torch.quantile(zs, 1 - a, dim=0) if a else zs.max(0).values
        step = ((hi - lo) / levels).clamp_min(1e-8)
        q = torch.clamp(torch.round((zs - lo) / step), 0, levels)
        err = ((q * step + lo - zs) ** 2).mean(0)                               # (d,)
        if best is None:
            best_err, best = err, (lo, step)
        else:
            take = err < best_err
            best_err = torch.where(take, err, best_err)
            best = (torch.where(take, lo, best[0]), torch.where(take, step, best[1]))
    return best


@torch.no_grad()
def fit_codec(tokens: torch.Tensor, indices: torch.Tensor, num_patches: int, dims: int, bits: int,
              mean: str = "position") -> TokenCodec:
    """Fit a DxB codec on head outputs of calibration images: tokens (M, P+K, D), indices (M, K)."""
    m, t, dim = tokens.shape
    k = indices.shape[1]
    p = t - k
    codec = TokenCodec(dim, num_patches, dims, bits, num_prefix=p)
    codec.mean_mode = mean
    patches = tokens[:, p:].reshape(-1, dim)                                    # (M K, D)
    flat_idx = indices.reshape(-1)
    if mean == "position":
        count = torch.bincount(flat_idx, minlength=num_patches).float()         # (N,)
        sums = torch.zeros(num_patches, dim).index_add_(0, flat_idx, patches)
        glob = patches.mean(0)
        codec.pos_mean.copy_(torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], glob))
    elif mean == "global":
        codec.pos_mean.copy_(patches.mean(0).expand(num_patches, dim))
    else:
        raise ValueError(f"codec mean {mean!r}: choose position or global")
    centred = patches - codec.pos_mean[flat_idx]
    basis, kept = _pca(centred, dims)
    codec.basis.copy_(basis)
    codec.variance_kept = kept
    codec.lo, codec.step = (b.contiguous() for b in _ranges(centred @ basis, codec.levels))
    if p:
        pre = tokens[:, :p]                                                      # (M, P, D)
        codec.prefix_mean.copy_(pre.mean(0))
        pc = (pre - codec.prefix_mean).reshape(-1, dim)
        pb, _ = _pca(pc, min(dims, dim))
        codec.prefix_basis.copy_(pb)
        codec.prefix_lo, codec.prefix_step = (b.contiguous() for b in _ranges(pc @ pb, codec.levels))
    return codec
