"""Mercury over a timm VisionTransformer: forward_head (device) and forward_tail (cloud).

What is modified in the timm model, and why (ToMe-style, no fork):
- Only when the selection reads the CLS attention (the `product` and `attention` scores, the
  top-k / EViT / Janus-like baselines), the Attention of each block whose CLS attention is
  needed (the pruning block; for the Janus-like baseline every pruning block) gets its class
  swapped to `CLSAttention`. It computes attention explicitly instead of with fused SDPA,
  because the fused kernel never materialises the attention matrix, and stores the CLS row
  averaged over heads. Numerically it is timm's unfused path (a copy of timm 1.0's
  Attention.forward: tests/models/test_timm_contract.py fails when timm's changes). The
  default `similarity` score never reads it, so the default model is timm's, untouched.
- With `prune_point="attn"` the pruning block's forward is taken apart into its two residual
  halves (timm's Block: x + attn(norm1(x)), then x + mlp(norm2(x))): selection runs on the
  stream after the attention half, and the MLP half runs on the kept tokens only. The score
  reads that stream through a `ScoreProxy` (pruning.py), a width-r stand-in for the MLP
  half, attached to the pruning block as `score_proxy` (so it is shared by every wrapper on
  the backbone and saved with its tensors; calibrate fits it).
- Nothing else. Prefix tokens (timm's `num_prefix_tokens`: the CLS, a distilled DeiT's
  distillation token, registers) are always sent and never pruned. The split follows timm's forward_features chain
  (patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks -> norm -> forward_head);
  Mercury only cuts `blocks` in two and puts pruning + reconstruction in the cut.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from timm.layers import Attention

from . import pruning as P
from .config import ConfigError, MercuryConfig
from .loading import create_backbone
from .reconstruction import build_reconstruction


class CLSAttention(Attention):
    """timm Attention that also keeps `cls_attn` (B, T-P): CLS -> patch attention, head-averaged
    (P = `num_prefix_tokens`, set when the class is swapped in; the CLS is token 0)."""

    num_prefix_tokens = 1

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                          # (B, H, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)                    # (B, H, N, N)
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        self.cls_attn = attn[:, :, :1, self.num_prefix_tokens:].mean((1, 2))   # (B, N-P): one Slice
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _check_attention(block: nn.Module) -> None:
    if not isinstance(block.attn, Attention):
        raise ConfigError(f"block attention is {type(block.attn).__name__}, not timm's Attention; "
                          "Mercury supports plain ViT/DeiT blocks")


def _patch_attention(block: nn.Module, num_prefix_tokens: int) -> None:
    _check_attention(block)
    block.attn.__class__ = CLSAttention
    block.attn.num_prefix_tokens = num_prefix_tokens


class Mercury(nn.Module):
    """A timm ViT split into device head and cloud tail with Mercury pruning in between.

    forward_head(images (B,3,H,W)) -> tokens (B, P+K, D), indices (B, K) ascending
    forward_tail(tokens, indices) -> logits (B, classes)
    forward(images) = forward_tail(*forward_head(images))
    P = num_prefix_tokens (timm's: 1 for a plain ViT/DeiT, 2 for a distilled DeiT, 1 + registers):
    the prefix tokens are sent first, always, and never pruned.
    """

    def __init__(self, backbone: nn.Module, cfg: MercuryConfig):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        m = backbone
        if not hasattr(m, "blocks") or not hasattr(m, "patch_embed"):
            raise ConfigError(f"{cfg.timm_model} is not a timm VisionTransformer")
        gh, gw = m.patch_embed.grid_size
        if gh != gw:
            raise ConfigError(f"{cfg.timm_model}: token grid {gh}x{gw} is not square; regional "
                              "pruning needs a sqrt(N) x sqrt(N) grid")
        self.has_cls = has_cls = getattr(m, "cls_token", None) is not None   # token 0, if any
        self.num_prefix_tokens = getattr(m, "num_prefix_tokens", 1)     # [CLS] (+ dist token) (+ registers)
        if getattr(m, "dynamic_img_size", False):
            raise ConfigError("dynamic_img_size models are not supported: K must be static")
        self.depth = len(m.blocks)
        cfg.validate(self.depth, gh, has_cls)
        self.grid, self.num_patches, self.dim = gh, gh * gw, m.embed_dim
        self.keep = cfg.num_keep(self.num_patches)
        self.prune_at = cfg.prune_after_block
        self.split = cfg.split
        if cfg.pruning == "janus" and cfg.split_after_block is None:
            self.split = min(self.depth, self.prune_at + cfg.janus_blocks - 1)
        self.prune_blocks = range(self.prune_at - 1, self.split) if cfg.pruning == "janus" else [self.prune_at - 1]
        for i in self.prune_blocks:
            _check_attention(m.blocks[i])
        self.reads_attention = cfg.reads_attention
        if cfg.uses_score_proxy:
            blk = self.prune_block
            if getattr(blk, "score_proxy", None) is None:
                blk.score_proxy = P.ScoreProxy(self.dim, cfg.score_proxy_rank, cfg.score_proxy_kind)
            elif (blk.score_proxy.rank, blk.score_proxy.kind) != (cfg.score_proxy_rank, cfg.score_proxy_kind):
                raise ConfigError(f"this backbone's score proxy is {blk.score_proxy.kind} of rank {blk.score_proxy.rank}, "
                                  f"not score_proxy_kind={cfg.score_proxy_kind}, score_proxy_rank={cfg.score_proxy_rank}")
        if self.reads_attention:
            self.record_attention()
        self.schedule = (P.janus_schedule(self.num_patches, self.keep, len(self.prune_blocks))
                         if cfg.pruning == "janus" else [self.keep])

        pos = m.pos_embed[0, -self.num_patches:] if m.pos_embed is not None else torch.zeros(self.num_patches, self.dim)
        self.backbone_params = sum(p.numel() for p in m.parameters())
        self.recon = build_reconstruction(
            cfg.reconstruction, num_patches=self.num_patches, dim=self.dim, grid=self.grid,
            num_heads=m.blocks[0].attn.num_heads, pos_embed=pos,
            backbone_params=self.backbone_params, rank=cfg.meta_rank, prefix=self.num_prefix_tokens)
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self.codec = None   # a TokenCodec (models/codec.py) when the tokens travel as codes

    def transmit(self, tokens: torch.Tensor, indices: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """What the tail receives: the tokens, or their codec round trip when a codec is set."""
        return tokens if self.codec is None else self.codec.roundtrip(tokens, indices, ste)

    def record_attention(self) -> None:
        """Swap in CLSAttention in the pruning block(s), so forward_prefix returns the CLS
        attention. Done at build time when this model's selection reads it; callers that share
        one prefix pass between several methods on this backbone (calibration, evaluation) call
        it too. The backbone is shared, so the swap holds for every wrapper on it. A model
        without a CLS token has no CLS attention (and no method that reads it): nothing to do."""
        if not self.has_cls:
            return
        for i in self.prune_blocks:
            _patch_attention(self.backbone.blocks[i], self.num_prefix_tokens)

    # ---------------------------------------------------------------- device
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.backbone
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)                                             # (B, P+N, D)

    def select(self, x: torch.Tensor, cls_attn: torch.Tensor | None, k: int) -> torch.Tensor:
        """Which patch tokens to keep: (B, P+N', D), (B, N') -> (B, K) ascending."""
        cfg, p = self.cfg, self.num_prefix_tokens
        b, n = x.shape[0], x.shape[1] - p
        if k >= n:
            return torch.arange(n, device=x.device).unsqueeze(0).expand(b, n)
        if cfg.pruning == "regional":
            return self.regional_rows(x, cls_attn, k)[:, p:, 0] - p
        if cfg.pruning in ("topk-attn", "topk-attn-fuse", "janus"):
            return P.topk_select(cls_attn, k)
        if cfg.pruning == "random":
            return P.random_select(b, n, k, self._gen).to(x.device)
        if cfg.pruning == "uniform":
            return P.uniform_select(b, n, k).to(x.device)
        raise ConfigError(f"unknown pruning {cfg.pruning!r}")

    def regional_rows(self, x: torch.Tensor, cls_attn: torch.Tensor | None, k: int) -> torch.Tensor:
        """Mercury's selection as token rows (B, P+K, 1): 0..P-1 (the prefix tokens), then
        P + kept patch indices."""
        p = self.num_prefix_tokens
        cost = P.selection_cost(self.score_stream(x), cls_attn, self.cfg.score, prefix=p)   # (B, P+N, 1)
        return P.regional_rows(cost, k, self.grid, self.cfg.region_size, prefix=p)

    @property
    def prune_block(self) -> nn.Module:
        """The block the selection happens in (after it, or inside it with prune_point "attn")."""
        return self.backbone.blocks[self.prune_at - 1]

    @property
    def score_proxy(self) -> P.ScoreProxy | None:
        return self.prune_block.score_proxy if self.cfg.uses_score_proxy else None

    def score_stream(self, x: torch.Tensor) -> torch.Tensor:
        """What the selection scores: x, or with the score proxy x + its MLP stand-in."""
        proxy = self.score_proxy
        return x if proxy is None else proxy(x, self.prune_block.norm2)

    def fit_score_proxy(self, x: torch.Tensor, seed: int = 0) -> dict | None:
        """Fit the score proxy on post-attention tokens x (M, P+N, D) of calibration images
        (forward_prefix's output), once per backbone: the selection, and so every head output,
        depends on it. None when there is none or it is already fitted (loaded, or fit for
        another keep ratio); else the fit's report (pruning.fit_score_proxy)."""
        proxy = self.score_proxy
        if proxy is None or bool(proxy.fitted):
            return None
        return P.fit_score_proxy(proxy, x, self.prune_block.norm2, self.prune_block.mlp, seed=seed)

    def forward_prefix(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks [0, prune_after_block) (prune_point "attn": the last one's attention half
        only): the part every pruning method shares. -> x (B, P+N, D), cls_attn (B, N), or None
        when the attention is not recorded (the default similarity score; see
        record_attention). (Evaluation reuses it across methods.)"""
        blocks = self.backbone.blocks
        x = self.embed(images)
        for blk in blocks[: self.prune_at - 1]:
            x = blk(x)
        blk = blocks[self.prune_at - 1]
        if self.cfg.prune_point == "attn":
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))      # (B, P+N, D) attention half
        else:
            x = blk(x)
        return x, blk.attn.cls_attn if isinstance(blk.attn, CLSAttention) else None

    def finish_prune_block(self, x: torch.Tensor) -> torch.Tensor:
        """The pruning block's MLP half on whatever tokens x holds (B, T, D) with prune_point
        "attn" (timm's Block, second residual); nothing with "block". forward_prefix then
        finish_prune_block is exactly blocks[:prune_after_block]."""
        if self.cfg.prune_point != "attn":
            return x
        blk = self.prune_block
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))        # (B, T, D)

    def forward_head(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prune(*self.forward_prefix(images))

    def prune(self, x: torch.Tensor, cls_attn: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """From the prefix output to what the device sends: select, gather, the pruning block's
        MLP half on the kept tokens (prune_point "attn"), the rest of the device blocks
        (EViT / Janus-like baselines) -> tokens (B, P+K, D), indices (B, K)."""
        blocks, p = self.backbone.blocks, self.num_prefix_tokens
        k0 = self.schedule[0]
        if self.reads_attention and cls_attn is None:
            raise ConfigError(f"{self.cfg.pruning} pruning with the {self.cfg.score} score reads the CLS "
                              "attention, but the prefix was run without it: call record_attention() "
                              "on the model that runs the prefix first")
        if self.cfg.pruning == "regional" and k0 < self.num_patches:   # rows: the gather index as is
            rows = self.regional_rows(x, cls_attn, k0)                   # (B, P+K0, 1)
            tokens, idx = P.batch_gather(x, rows), rows[:, p:, 0] - p    # (B, P+K0, D), (B, K0)
        else:
            idx = self.select(x, cls_attn, k0)                           # (B, K0)
            tokens = P.gather_tokens(x, idx, p)                          # (B, P+K0, D)
        fused = (P.fuse_pruned(x, idx, cls_attn, p)
                 if self.cfg.pruning == "topk-attn-fuse" and idx.shape[1] < self.num_patches else None)
        if fused is not None and self.cfg.prune_point == "attn":   # the MLP half on kept + fused
            out = self.finish_prune_block(torch.cat([tokens, fused], 1))
            tokens, fused = out[:, :-1], out[:, -1:]
        else:
            tokens = self.finish_prune_block(tokens)                     # (B, P+K0, D)
        for step, blk in enumerate(blocks[self.prune_at: self.split], start=1):
            if fused is not None:   # EViT: the fused token rides along as the last token
                out = blk(torch.cat([tokens, fused], 1))
                tokens, fused = out[:, :-1], out[:, -1:]
            else:
                tokens = blk(tokens)
            if self.cfg.pruning == "janus":   # progressive: drop more after each device block
                sub = P.topk_select(blk.attn.cls_attn, self.schedule[step])   # into current kept
                idx = torch.gather(idx, 1, sub)
                tokens = P.gather_tokens(tokens, sub, p)
        if fused is not None:
            tokens = torch.cat([tokens, fused], 1)                       # (B, P+K+1, D)
        return tokens, idx

    # ---------------------------------------------------------------- cloud
    def forward_tail(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        m = self.backbone
        x = self.recon(tokens, indices)                                  # (B, P+N, D)
        for blk in m.blocks[self.split:]:
            x = blk(x)
        x = m.norm(x)
        return m.forward_head(x)                                         # (B, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, idx = self.forward_head(images)
        return self.forward_tail(self.transmit(tokens, idx), idx)

    # ---------------------------------------------------------------- facts
    def num_meta_params(self) -> int:
        return self.recon.num_meta_params()


def build_mercury(cfg: MercuryConfig, backbone: nn.Module | None = None) -> Mercury:
    """Backbone from cfg (or the one given, shared between several Mercury wrappers)."""
    return Mercury(create_backbone(cfg) if backbone is None else backbone, cfg).eval()


def models_sharing_backbone(base: MercuryConfig, keep_ratios: list[float] | None = None,
                            keep_tokens: list[int] | None = None) -> list[Mercury]:
    """One Mercury per keep ratio (or per kept-token count), all over one backbone built once."""
    keys = keep_ratios if keep_ratios is not None else keep_tokens
    models, backbone = [], None
    for key in keys:
        cfg = copy.deepcopy(base)
        cfg.keep_ratio, cfg.keep_tokens = (key, None) if keep_ratios is not None else (None, key)
        m = build_mercury(cfg, backbone)
        backbone = m.backbone
        models.append(m)
    return models


def load_meta(m: Mercury, tensors: dict, k: int) -> None:
    """Load the `meta.<K>.*` tensors of a checkpoint into m's reconstruction."""
    prefix = f"meta.{k}."
    m.recon.load_state_dict({n.removeprefix(prefix): v for n, v in tensors.items() if n.startswith(prefix)})
