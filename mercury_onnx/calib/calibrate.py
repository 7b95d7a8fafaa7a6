"""Learn the reconstruction's parameters with the backbone frozen (distillation).

Recipe, cheapest first:
1. One pass of the *prefix* (blocks before the prune point) over the calibration images,
   shared by every method and keep ratio. The vanilla teacher logits come from the same pass
   (the prefix output continued through the remaining blocks).
2. Per method: its head outputs (tokens, indices) from the stored prefix output; the head is
   frozen, so they are computed once and training only runs through the tail.
3. Closed-form init from statistics of the true tokens at the split (no backward pass):
   meta-pos: b = mean pruned token, U V = rank-r SVD of the per-position means minus b;
   meta-ctx: the same plus a reduced-rank least-squares map from c (mean received token) to
   each pruned token's deviation from its position mean; meta-local: the meta-pos fit to
   x_i - n_i (n_i the nearest received token); mask: mean of (x_i - pos_i);
   generator: mask init and the extra block starts as the identity (zeroed output layers).
4. A few steps of AdamW on T^2 KL(teacher || student) (+ CE on labels when asked), cosine
   schedule with warmup, through the frozen tail.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.mercury import Mercury
from ..models.reconstruction import Generator, MaskToken, MetaCtx, MetaLocal, MetaPos
from .data import ImageSet


@dataclass
class CalibSettings:
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    temperature: float = 1.0
    ce_weight: float = 0.0        # 0 = pure distillation (labels unused)
    warmup: float = 0.1           # fraction of steps
    seed: int = 0
    closed_form_init: bool = True


@dataclass
class Prefixed:
    """What every method shares on a set of images: prefix output, CLS attention, teacher."""
    x: torch.Tensor               # (M, P+N, D) tokens at the prune point (forward_prefix)
    cls_attn: torch.Tensor        # (M, N)
    teacher: torch.Tensor         # (M, C) vanilla logits
    labels: torch.Tensor          # (M,)

    def __len__(self) -> int:
        return len(self.labels)


def finish_vanilla(backbone, x: torch.Tensor, start: int) -> torch.Tensor:
    """Blocks [start, depth) on all tokens, norm, head: the vanilla model from the prefix."""
    for blk in backbone.blocks[start:]:
        x = blk(x)
    return backbone.forward_head(backbone.norm(x))


@torch.inference_mode()
def run_prefix(model: Mercury, images: ImageSet, batch_size: int = 256, progress: bool = True) -> Prefixed:
    from tqdm import tqdm

    model.record_attention()      # shared by every method, some of which read the CLS attention
    xs, attns, logits = [], [], []
    for imgs, _ in tqdm(images.batches(batch_size), total=math.ceil(len(images) / batch_size),
                        desc="prefix + teacher", disable=not progress, leave=False):
        x, a = model.forward_prefix(imgs)
        xs.append(x), attns.append(a.clone())
        logits.append(finish_vanilla(model.backbone, model.finish_prune_block(x), model.prune_at))
    return Prefixed(torch.cat(xs), torch.cat(attns), torch.cat(logits), images.labels.clone())


@torch.inference_mode()
def head_outputs(model: Mercury, pre: Prefixed, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """What the frozen head delivers to the tail for every stored image: (M, P+K', D), (M, K).
    With a codec on the model these are the decoded codes, so the fill is calibrated on what
    the cloud really receives (codec in the loop; nothing before the codec is trained, so the
    rounding needs no gradient)."""
    toks, idxs = [], []
    for s in range(0, len(pre), batch_size):
        t, i = model.prune(pre.x[s: s + batch_size], pre.cls_attn[s: s + batch_size])
        toks.append(model.transmit(t, i)), idxs.append(i)
    return torch.cat(toks), torch.cat(idxs)


@torch.inference_mode()
def tail_logits(model: Mercury, tokens: torch.Tensor, idx: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model.forward_tail(tokens[s: s + batch_size], idx[s: s + batch_size])
                      for s in range(0, len(tokens), batch_size)])


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                 labels: torch.Tensor | None = None, ce_weight: float = 0.0) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), + ce_weight * CE(s, labels)."""
    t = temperature
    loss = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    log_target=True, reduction="batchmean") * t * t
    if ce_weight and labels is not None:
        loss = loss + ce_weight * F.cross_entropy(student, labels)
    return loss


# ---------------------------------------------------------------- closed-form init

def _pruned_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.ones(idx.shape[0], n).scatter(1, idx, 0.0)           # (M, N) 1 = pruned


@torch.no_grad()
def init_from_statistics(model: Mercury, pre: Prefixed, tokens: torch.Tensor, idx: torch.Tensor,
                         ridge: float = 1e-2) -> None:
    """Set the reconstruction's parameters to the MSE-best fill of the pruned tokens at the split."""
    recon, n = model.recon, model.num_patches
    if not recon.learned:
        return
    p = model.num_prefix_tokens
    patches = torch.cat([model.finish_prune_block(pre.x[s: s + 256]) for s in range(0, len(pre), 256)])[:, p:]   # (M, N, D)
    if isinstance(recon, MetaLocal):   # fit the correction to the nearest received token
        patches = patches - torch.cat([recon.nearest.fill(tokens[s: s + 256], idx[s: s + 256])
                                       for s in range(0, len(idx), 256)])
    mask = _pruned_mask(idx, n)                                          # (M, N)
    count = mask.sum(0)                                                  # (N,)
    if count.sum() == 0:   # nothing pruned (K = N): the fill is never used
        return
    total = mask.sum().clamp_min(1)
    mean_all = (mask.unsqueeze(-1) * patches).sum((0, 1)) / total       # (D,)
    pos_mean = (mask.unsqueeze(-1) * patches).sum(0) / count.clamp_min(1).unsqueeze(-1)   # (N, D)
    pos_mean = torch.where(count.unsqueeze(-1) > 0, pos_mean, mean_all)
    if isinstance(recon, MaskToken):   # mask and generator: fill = pos_i + m
        recon.mask_token.copy_(mean_all - (mask.unsqueeze(-1) * recon.pos).sum((0, 1)) / total)
        if isinstance(recon, Generator):   # start as the identity: zero the residual branches
            for lin in (recon.block.attn.proj, recon.block.mlp.fc2):
                lin.weight.zero_(), lin.bias.zero_()
        return
    if not isinstance(recon, MetaPos):
        return
    r = recon.pos_code.shape[1]
    u, s, vh = torch.linalg.svd(pos_mean - mean_all, full_matrices=False)   # (N,q) (q,) (q,D)
    q = min(r, s.numel())
    recon.pos_code.zero_(), recon.basis.zero_()
    recon.pos_code[:, :q] = u[:, :q] * s[:q]
    recon.basis[:q] = vh[:q]
    recon.bias.copy_(mean_all)
    if not isinstance(recon, MetaCtx) or isinstance(recon, MetaLocal):   # meta-local: context map stays 0
        return
    # Reduced-rank ridge regression, shared over positions: x_i - mu_i ~ (c - c_bar) W.
    c = tokens[:, p: p + idx.shape[1]].mean(1)                           # (M, D) mean received token
    z = c - c.mean(0)                                                    # (M, D)
    n_s = mask.sum(1)                                                    # (M,)
    resid = (mask.unsqueeze(-1) * patches).sum(1) - mask @ pos_mean      # (M, D) sum of pruned deviations
    gram = (z * n_s.unsqueeze(-1)).T @ z                                 # (D, D)
    gram = gram + (ridge * gram.diagonal().mean() + 1e-6) * torch.eye(z.shape[1])
    w = torch.linalg.solve(gram, z.T @ resid)                            # (D, D)
    _, _, vh_w = torch.linalg.svd(w.T @ gram @ w)                        # fitted-value directions
    vr = vh_w[:r].T                                                      # (D, r)
    recon.ctx_down.copy_(w @ vr)                                         # (D, r)
    recon.ctx_up.copy_(vr.T)                                             # (r, D)
    recon.bias.sub_(c.mean(0) @ w @ vr @ vr.T)                           # so the fill is mu_i at c = c_bar


@torch.no_grad()
def choose_init(model: Mercury, pre: Prefixed, tokens: torch.Tensor, idx: torch.Tensor, s: CalibSettings,
                probe: int = 256) -> str:
    """Closed-form init, kept only if it lowers the distillation loss on (up to) `probe`
    calibration images; the MSE-best fill is not always the KL-best one (e.g. a constant
    per-position mean can be worse than the zero default). Returns the choice."""
    n = min(probe, len(tokens))

    def loss() -> float:
        return distill_loss(tail_logits(model, tokens[:n], idx[:n]), pre.teacher[:n], s.temperature).item()

    default = {k: v.clone() for k, v in model.recon.state_dict().items()}
    before = loss()
    init_from_statistics(model, pre, tokens, idx)
    if loss() < before:
        return "closed-form"
    model.recon.load_state_dict(default)
    return "default"


# ---------------------------------------------------------------- distillation

def train_meta(model: Mercury, tokens: torch.Tensor, idx: torch.Tensor, teacher: torch.Tensor,
               labels: torch.Tensor, s: CalibSettings, progress: bool = True, desc: str = "calibrate") -> list[float]:
    """AdamW on the reconstruction's parameters only; returns the loss of every step."""
    from tqdm import tqdm

    params = [p for p in model.recon.parameters()]
    if not params or s.steps <= 0:
        return []
    frozen = [p for p in model.backbone.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    warm = max(1, int(s.warmup * s.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, i + 1 - warm) / max(1, s.steps - warm))))))
    gen = torch.Generator().manual_seed(s.seed)
    model.recon.train()
    losses = []
    bar = tqdm(range(s.steps), desc=desc, disable=not progress, leave=False)
    try:
        for _ in bar:
            sel = torch.randint(len(tokens), (min(s.batch_size, len(tokens)),), generator=gen)
            out = model.forward_tail(tokens[sel], idx[sel])
            loss = distill_loss(out, teacher[sel], s.temperature, labels[sel], s.ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(), sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        model.recon.eval()
        for p in frozen:
            p.requires_grad_(True)
    return losses


def score(model: Mercury, pre: Prefixed, s: CalibSettings) -> dict:
    """Held-out top-1 and distillation loss of the model as it is now."""
    tokens, idx = head_outputs(model, pre)
    logits = tail_logits(model, tokens, idx)
    return {"top1": (logits.argmax(-1) == pre.labels).float().mean().item(),
            "loss": distill_loss(logits, pre.teacher, s.temperature).item()}


def calibrate(model: Mercury, train: Prefixed, s: CalibSettings, heldout: Prefixed | None = None,
              progress: bool = True) -> dict:
    """Calibrate one Mercury wrapper (one keep ratio, one method). Returns a report."""
    t0 = time.time()
    report: dict = {"keep_tokens": model.keep, "pruning": model.cfg.pruning,
                    "reconstruction": model.cfg.reconstruction, "images": len(train)}
    if not model.recon.learned:
        return report
    proxy = model.fit_score_proxy(train.x, s.seed)   # prune point attn: before any head output
    if proxy is not None:
        report["score_proxy"] = proxy
    tokens, idx = head_outputs(model, train)
    if heldout is not None:
        report["heldout_images"] = len(heldout)
        report["heldout_vanilla_top1"] = (heldout.teacher.argmax(-1) == heldout.labels).float().mean().item()
        report["heldout_untrained"] = score(model, heldout, s)
    if s.closed_form_init:
        report["init"] = choose_init(model, train, tokens, idx, s)
    if heldout is not None:
        report["heldout_before"] = score(model, heldout, s)
    losses = train_meta(model, tokens, idx, train.teacher, train.labels, s, progress,
                        desc=f"calibrate K={model.keep} {model.cfg.pruning}+{model.cfg.reconstruction}")
    if losses:
        k = max(1, len(losses) // 10)
        report["train_loss_first"] = sum(losses[:k]) / k
        report["train_loss_last"] = sum(losses[-k:]) / k
    if heldout is not None:
        report["heldout_after"] = score(model, heldout, s)
    report.update(steps=s.steps, batch_size=s.batch_size, lr=s.lr, temperature=s.temperature,
                  ce_weight=s.ce_weight, closed_form_init=s.closed_form_init,
                  minutes=round((time.time() - t0) / 60, 3))
    return report
