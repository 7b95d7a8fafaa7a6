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

The entropy codec `eP` (e.g. `e6`: about 6% relative token error on the calibration images)
is the same graph with b = 8 and a different fit, made for an entropy coder on the wire
(formats/codec_wire.py). `fit_entropy_codec` keeps every principal channel worth its bits: per
channel it picks a step from a common step Delta times 2^(j/4), or drops the channel, by the
lowest squared error + lambda * bits (lambda = LAMBDA * Delta^2, bits = the channel's entropy on
the calibration codes), and bisects Delta to the error target. Codes are q + 128 (q a signed
step count); the cloud reconstructs each (channel, code) at its calibration centroid (`recon`,
a (d, 256) table), not the bin centre: at one or two steps per channel that is a real part of
the error. Bits follow the variance, as reverse water-filling prescribes, with no bit budget
per channel; the prefix rows share the patches' basis, steps and table (one row per image).
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.codec_wire import parse_codec, parse_entropy

CLIP_QUANTILES = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2)
STEP_MULTIPLIERS = 2.0 ** (torch.arange(-2, 9) / 4)     # per-channel steps the entropy fit tries, x Delta
LAMBDA = 0.08                                           # lambda = LAMBDA * Delta^2 per bit
BISECT_ROWS = 8192                                      # token rows the Delta bisection looks at


class TokenCodec(nn.Module):
    """PCA + uniform per-channel quantisation of the head's tokens; see the module docstring."""

    def __init__(self, dim: int, num_patches: int, dims: int, bits: int, num_prefix: int = 1,
                 entropy: float | None = None):
        super().__init__()
        if dims > dim:
            raise ValueError(f"codec with {dims} dims on tokens of width {dim}")
        self.dims, self.bits, self.num_prefix = dims, bits, num_prefix
        self.entropy = entropy            # eP codec: the relative error it was fit to; None for DxB
        self.levels = 2 ** bits - 1
        self.register_buffer("pos_mean", torch.zeros(num_patches, dim))     # (N, D)
        self.register_buffer("basis", torch.zeros(dim, dims))               # (D, d)
        self.register_buffer("lo", torch.zeros(dims))
        self.register_buffer("step", torch.ones(dims))
        self.register_buffer("prefix_mean", torch.zeros(num_prefix, dim))   # (P, D)
        self.register_buffer("prefix_basis", torch.zeros(dim, dims))
        self.register_buffer("prefix_lo", torch.zeros(dims))
        self.register_buffer("prefix_step", torch.ones(dims))
        if entropy is not None:
            if bits != 8:
                raise ValueError("an entropy codec sends 8-bit codes")
            self.register_buffer("recon", torch.zeros(dims, 256))             # (d, 256) centroids
        self.variance_kept = float("nan")
        self.mean_mode = "position"

    @property
    def name(self) -> str:
        return f"{self.dims}x{self.bits}" if self.entropy is None else f"e{self.entropy * 100:g}"

    def _levels(self, q: torch.Tensor, step, lo) -> torch.Tensor:
        """Codes (.., d) as floats -> principal coordinates: bin centres, or the centroids."""
        if self.entropy is None:
            return q * step + lo
        flat = q.long() + 256 * torch.arange(self.dims, device=q.device)      # (.., d) into (d*256,)
        return self.recon.reshape(-1)[flat]

    def _round(self, u: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """Quantiser units -> code levels (float) in [0, levels]; straight-through when ste:
        forward rounds, backward is the identity."""
        r = torch.round(u)
        if ste:
            r = u + (r - u).detach()
        return torch.clamp(r, 0, self.levels)

    def units(self, tokens: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((x - mean) @ basis - lo) / step of the prefix (B, P, d) and kept (B, K, d) rows, with the
        affine parts folded into one matrix and one per-position offset table (constants, so the
        head graph runs one MatMul, one Gather of a (N, d) table and one Sub before rounding)."""
        p = self.num_prefix
        up = tokens[:, :p] @ (self.prefix_basis / self.prefix_step) \
            - (self.prefix_mean @ self.prefix_basis + self.prefix_lo) / self.prefix_step
        offset = (self.pos_mean @ self.basis + self.lo) / self.step                    # (N, d)
        uk = tokens[:, p:] @ (self.basis / self.step) - offset[indices]
        return up, uk

    def encode(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B, P+K, D) float, (B, K) -> codes (B, P+K, d) uint8."""
        up, uk = self.units(tokens, indices)
        return self._round(torch.cat([up, uk], 1)).to(torch.uint8)

    def decode(self, codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """codes (B, P+K, d) uint8 (or float levels), (B, K) -> tokens (B, P+K, D) float32."""
        p = self.num_prefix
        q = codes.to(torch.float32)
        return self._tokens(self._levels(q[:, :p], self.prefix_step, self.prefix_lo),
                            self._levels(q[:, p:], self.step, self.lo), indices)

    def _tokens(self, yp: torch.Tensor, yk: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Principal coordinates (B, P, d), (B, K, d) -> tokens (B, P+K, D)."""
        xp = yp @ self.prefix_basis.T + self.prefix_mean
        xk = yk @ self.basis.T + self.pos_mean[indices]
        return torch.cat([xp, xk], 1)

    def roundtrip(self, tokens: torch.Tensor, indices: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """decode(encode(tokens)) in float, with straight-through rounding when ste."""
        up, uk = self.units(tokens, indices)
        if self.entropy is None:
            return self.decode(self._round(torch.cat([up, uk], 1), ste), indices)
        p = self.num_prefix
        q = self._round(torch.cat([up, uk], 1))
        yp, yk = self._levels(q[:, :p], None, None), self._levels(q[:, p:], None, None)
        if ste:   # forward: the centroids; backward: the identity on the principal coordinates
            zp, zk = up * self.prefix_step + self.prefix_lo, uk * self.step + self.lo
            yp, yk = zp + (yp - zp).detach(), zk + (yk - zk).detach()
        return self._tokens(yp, yk, indices)

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
def _position_means(patches: torch.Tensor, flat_idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Mean of the kept patch rows (M K, D) at each position (flat_idx (M K,)) -> (N, D), in the
    rows' dtype; a position never kept gets the mean of all rows."""
    count = torch.bincount(flat_idx, minlength=num_patches).to(patches.dtype)           # (N,)
    sums = torch.zeros(num_patches, patches.shape[1], dtype=patches.dtype).index_add_(0, flat_idx, patches)
    return torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], patches.mean(0))


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
        codec.pos_mean.copy_(_position_means(patches, flat_idx, num_patches))
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


def _centred_rows(tokens: torch.Tensor, indices: torch.Tensor, num_patches: int):
    """Per-position patch means (N, D), prefix means (P, D) and the centred rows (M, P+K, D),
    all float64, from head outputs tokens (M, P+K, D) at kept positions indices (M, K)."""
    t = tokens.double()
    m, _, dim = t.shape
    p = t.shape[1] - indices.shape[1]
    pos_mean = _position_means(t[:, p:].reshape(-1, dim), indices.reshape(-1), num_patches)
    prefix_mean = t[:, :p].mean(0)
    mean = torch.cat([prefix_mean.expand(m, p, dim), pos_mean[indices]], 1)
    return pos_mean, prefix_mean, t - mean


def _entropy_choice(y: torch.Tensor, delta: float, smin: torch.Tensor):
    """Per channel of calibration coordinates y (R, D): the step (delta x a multiplier, at least
    smin) or dropping (step 0) with the lowest squared error + LAMBDA delta^2 x entropy bits,
    reconstruction at the centroids. -> steps (D,), centroid tables (D, 256)."""
    r, dim = y.shape
    lam = LAMBDA * delta ** 2
    y2 = y ** 2
    best_cost = y2.sum(0)                                                   # dropping the channel
    y_flat, y2_flat = y.reshape(-1), y2.reshape(-1)                          # bincount weights
    steps, tables = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, 256, dtype=torch.float64)
    offsets = 256 * torch.arange(dim)
    for mult in STEP_MULTIPLIERS.tolist():
        s = torch.clamp(smin, min=delta * mult)                             # (D,)
        flat = (torch.clamp(torch.round(y / s), -128, 127).long() + 128 + offsets).reshape(-1)
        n = torch.bincount(flat, minlength=dim * 256).view(dim, 256).double()
        sy = torch.bincount(flat, y_flat, minlength=dim * 256).view(dim, 256)
        sy2 = torch.bincount(flat, y2_flat, minlength=dim * 256).view(dim, 256)
        dist = (sy2 - sy ** 2 / n.clamp_min(1)).sum(1)                      # centroid error per channel
        p = n / r
        bits = -(p * torch.log2(p.clamp_min(1e-300))).sum(1) * r
        cost = dist + lam * bits
        take = cost < best_cost
        best_cost = torch.where(take, cost, best_cost)
        steps = torch.where(take, s, steps)
        centres = (torch.arange(256, dtype=torch.float64) - 128) * s[:, None]
        tables = torch.where(take[:, None], torch.where(n > 0, sy / n.clamp_min(1), centres), tables)
    return steps, tables


def _image_error(y: torch.Tensor, steps: torch.Tensor, tables: torch.Tensor, norms: torch.Tensor) -> float:
    """Mean over images of ||X_hat - X||_F / ||X||_F for coordinates y (M, T, D) coded with
    steps/tables (dropped channels: step 0, reconstructed as 0). The basis is orthonormal and
    complete, so the error in coordinates is the token error."""
    kept = steps > 0
    yk = y[..., kept]
    code = torch.clamp(torch.round(yk / steps[kept]), -128, 127).long() + 128
    rec = tables[kept].reshape(-1)[code + 256 * torch.arange(int(kept.sum()))]          # centroids
    err2 = ((yk - rec) ** 2).sum((1, 2)) + (y[..., ~kept] ** 2).sum((1, 2))
    return float((err2.sqrt() / norms).mean())


@torch.no_grad()
def fit_entropy_codec(tokens: torch.Tensor, indices: torch.Tensor, num_patches: int, rel_err: float) -> TokenCodec:
    """Fit an eP codec (module docstring) on head outputs of calibration images so that their
    mean relative token error is rel_err: tokens (M, P+K, D), indices (M, K)."""
    m, t, dim = tokens.shape
    p = t - indices.shape[1]
    pos_mean, prefix_mean, z = _centred_rows(tokens, indices, num_patches)    # z (M, T, D)
    rows = z.reshape(-1, dim)
    evals, evecs = torch.linalg.eigh(rows.T @ rows / len(rows))
    basis, evals = evecs.flip(1), evals.flip(0).clamp_min(0)                  # (D, D), descending
    y = z @ basis                                                              # (M, T, D)
    norms = tokens.double().flatten(1).norm(dim=1)                             # (M,)
    smin = y.abs().amax((0, 1)) / 127                                          # no calibration code clips
    rms = float(rows.pow(2).mean().sqrt())
    sub = torch.randperm(m, generator=torch.Generator().manual_seed(0))[:max(16, -(-BISECT_ROWS // t))]
    ys, ns = y[sub], norms[sub]                       # Delta is bisected on a subset, the tables use all
    lo, hi = rms * 1e-2, rms * 2
    for _ in range(16):                                                        # geometric bisection on Delta
        delta = (lo * hi) ** 0.5
        steps, tables = _entropy_choice(ys.reshape(-1, dim), delta, smin)
        lo, hi = (delta, hi) if _image_error(ys, steps, tables, ns) < rel_err else (lo, delta)
    steps, tables = _entropy_choice(y.reshape(-1, dim), lo, smin)
    kept = steps > 0
    d = int(kept.sum())
    if d == 0:
        raise ValueError(f"an entropy codec at {rel_err:.1%} error drops every channel: ask for less error")
    codec = TokenCodec(dim, num_patches, d, 8, num_prefix=p, entropy=rel_err)
    codec.pos_mean.copy_(pos_mean)
    codec.prefix_mean.copy_(prefix_mean)
    for b in (codec.basis, codec.prefix_basis):
        b.copy_(basis[:, kept])
    for lo_, st in ((codec.lo, codec.step), (codec.prefix_lo, codec.prefix_step)):
        st.copy_(steps[kept])
        lo_.copy_(-128 * steps[kept])
    codec.recon.copy_(tables[kept])
    codec.variance_kept = float(evals[kept].sum() / evals.sum().clamp_min(1e-30))
    codec.delta = lo
    return codec


def fit_named(tokens: torch.Tensor, indices: torch.Tensor, num_patches: int, name: str) -> TokenCodec:
    """fit_codec for 'DxB', fit_entropy_codec for 'eP'."""
    rel = parse_entropy(name)
    if rel is not None:
        return fit_entropy_codec(tokens, indices, num_patches, rel)
    return fit_codec(tokens, indices, num_patches, *parse_codec(name))
