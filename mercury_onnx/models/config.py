"""MercuryConfig: which backbone, where to prune and split, how many tokens to keep.

One small dataclass that every stage (calib, export, runtime) reads. It round-trips through
JSON; the backbone part uses the same keys as the reference checkpoint's JSON in
`../shared/models/` (`timm_model`, `overrides`, `classes`, `mean`, `std`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

PRUNING_METHODS = ("regional", "random", "topk-attn", "topk-attn-fuse", "uniform", "janus")
SCORE_VARIANTS = ("similarity", "product", "attention")
SCORE_ALIASES = {"mercury": "product"}   # the name checkpoints written before the default changed use
RECONSTRUCTIONS = ("meta-pos", "meta-ctx", "meta-local", "none", "zero", "duplicate", "mask", "generator")
META_RECONSTRUCTIONS = ("meta-pos", "meta-ctx", "meta-local")
PRUNE_POINTS = ("block", "attn")   # prune after block prune_after_block, or inside it before its MLP
# the selections that read the CLS token's attention (the others never materialise it)
ATTENTION_PRUNING = ("topk-attn", "topk-attn-fuse", "janus")
ATTENTION_SCORES = ("product", "attention")

# Paper: meta-parameters are at most 0.13% of the model (<= 0.11 M for DeiT-B).
META_BUDGET_FRACTION = 0.0013


class ConfigError(ValueError):
    """A model or setting Mercury cannot run with. The message says what to change."""


@dataclass
class MercuryConfig:
    # --- backbone (same keys as ../shared/models/*.json) ---
    timm_model: str = "deit_small_patch16_224"
    checkpoint: str | None = None          # .safetensors / .pth; None = timm init or hub weights
    pretrained: bool = False               # ask timm for hub weights (needs network)
    overrides: dict = field(default_factory=dict)   # img_size, patch_size, num_classes, ...
    classes: list[str] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    # --- the method ---
    prune_after_block: int = 1             # prune after this many blocks (1 = after the first)
    prune_point: str = "block"             # "block": after the whole block (the paper's); "attn": after
                                           # its attention, so its MLP runs on the kept tokens only
    score_proxy_rank: int = 64             # prune_point "attn": score x + a width-r stand-in for the
                                           # MLP half (pruning.ScoreProxy, fit by calibrate); 0 = score x
    score_proxy_kind: str = "gelu"         # its kind: "gelu" (a small MLP) or "linear" (rank-r map)
    split_after_block: int | None = None   # device runs blocks [0, split); None = prune_after_block
    keep_ratio: float | None = 0.5         # fraction of the N patch tokens kept ...
    keep_tokens: int | None = None         # ... or K directly (wins over keep_ratio)
    region_size: int = 2                   # each subregion is region_size x region_size tokens
    pruning: str = "regional"
    score: str = "similarity"              # Eq. 12 variant; "product" = a_i * d_i (see pruning.py)
    reconstruction: str = "meta-local"
    meta_rank: int | None = None           # None = largest rank that fits the 0.13% budget
    janus_blocks: int = 3                  # Janus-like baseline: prune progressively over this many blocks
    seed: int = 0                          # for the random-pruning baseline

    @property
    def split(self) -> int:
        return self.prune_after_block if self.split_after_block is None else self.split_after_block

    @property
    def uses_score_proxy(self) -> bool:
        """Whether the selection scores the post-attention stream through a ScoreProxy."""
        return self.prune_point == "attn" and self.pruning == "regional" and self.score_proxy_rank > 0

    @property
    def reads_attention(self) -> bool:
        """Whether the selection reads the CLS attention (else the default model is timm's as is)."""
        score = SCORE_ALIASES.get(self.score, self.score)
        return self.pruning in ATTENTION_PRUNING or (self.pruning == "regional" and score in ATTENTION_SCORES)

    def num_keep(self, num_patches: int) -> int:
        """K, the number of patch tokens kept (CLS is kept on top of these)."""
        if self.keep_tokens is not None:
            return int(self.keep_tokens)
        if self.keep_ratio is None:
            raise ConfigError("set keep_ratio or keep_tokens")
        return max(1, int(round(self.keep_ratio * num_patches)))

    def validate(self, depth: int, grid: int, has_cls: bool) -> None:
        """Raise ConfigError for any setting this backbone can't run with."""
        if not has_cls and self.reads_attention:
            raise ConfigError(f"{self.timm_model} has no CLS token, and {self.pruning} pruning with the "
                              f"{self.score} score reads the CLS token's attention; use regional pruning "
                              "with the similarity score (the default), which needs none")
        if self.pruning not in PRUNING_METHODS:
            raise ConfigError(f"unknown pruning {self.pruning!r}; choose from {PRUNING_METHODS}")
        self.score = SCORE_ALIASES.get(self.score, self.score)
        if self.score not in SCORE_VARIANTS:
            raise ConfigError(f"unknown score {self.score!r}; choose from {SCORE_VARIANTS}")
        if self.prune_point not in PRUNE_POINTS:
            raise ConfigError(f"unknown prune_point {self.prune_point!r}; choose from {PRUNE_POINTS}")
        if self.score_proxy_kind not in ("gelu", "linear"):
            raise ConfigError(f"score_proxy_kind={self.score_proxy_kind!r}: choose gelu or linear")
        if not isinstance(self.score_proxy_rank, int) or self.score_proxy_rank < 0:
            raise ConfigError(f"score_proxy_rank={self.score_proxy_rank!r} must be an integer >= 0")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"unknown reconstruction {self.reconstruction!r}; choose from {RECONSTRUCTIONS}")
        if self.pruning == "topk-attn-fuse" and self.reconstruction != "none":
            raise ConfigError("topk-attn-fuse (EViT) fuses pruned tokens into one extra token; "
                              "it only makes sense with reconstruction='none'")
        if not 1 <= self.prune_after_block <= depth:
            raise ConfigError(f"prune_after_block={self.prune_after_block} is out of range 1..{depth} "
                              f"for {self.timm_model} ({depth} blocks)")
        split = self.split
        if self.pruning == "janus" and self.split_after_block is None:
            split = min(depth, self.prune_after_block + self.janus_blocks - 1)
        if not self.prune_after_block <= split <= depth:
            raise ConfigError(f"split_after_block={split} must be in {self.prune_after_block}..{depth}")
        n = grid * grid
        if self.keep_ratio is not None and self.keep_tokens is None and not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"keep_ratio={self.keep_ratio} must be in (0, 1]")
        k = self.num_keep(n)
        if not 1 <= k <= n:
            raise ConfigError(f"K={k} must be in 1..{n} (the number of patch tokens)")
        if self.pruning == "regional" and k < n:
            if self.region_size < 1 or grid % self.region_size:
                raise ConfigError(f"region_size={self.region_size} does not divide the {grid}x{grid} "
                                  f"token grid; pick a divisor of {grid}")
            regions = (grid // self.region_size) ** 2
            if k < regions:
                raise ConfigError(f"K={k} is smaller than the {regions} subregions (l^2): every region "
                                  f"keeps one token, so raise keep_ratio to >= {regions / n:.3f} or "
                                  f"use larger regions (region_size)")

    # --- JSON round trip ---
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MercuryConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_checkpoint_json(cls, path: str | Path, **kw) -> "MercuryConfig":
        """Config from a backbone JSON like ../shared/models/*.json.

        The weights file is the JSON's sibling with the same stem (.safetensors or .pth).
        """
        path = Path(path)
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read checkpoint JSON {path}: {e}") from e
        if "timm_model" not in meta:
            raise ConfigError(f"{path} has no 'timm_model' key; is it a checkpoint JSON?")
        weights = None
        for ext in (".safetensors", ".pth", ".pt", ".bin"):
            if path.with_suffix(ext).exists():
                weights = str(path.with_suffix(ext))
                break
        return cls(timm_model=meta["timm_model"], checkpoint=weights,
                   overrides=dict(meta.get("overrides", {})), classes=meta.get("classes"),
                   mean=meta.get("mean"), std=meta.get("std"), **kw)


def meta_budget(num_params: int) -> int:
    """Most meta-parameters allowed for a backbone of num_params parameters."""
    return int(math.floor(META_BUDGET_FRACTION * num_params))
