"""Top-1 of vanilla, Mercury and every baseline on an ImageFolder split.

Speed: the prefix (blocks before the prune point) is the same for every method, so it runs
once per batch and each method only runs its pruning + tail on the stored output; the
vanilla model is the prefix output continued through the remaining blocks.

Learned reconstructions: Mercury's meta-parameters come from the checkpoint. Every other
method with a learned reconstruction is calibrated on the fly (see `calibrate.py`) on train
images with the same budget as the checkpoint's own calibration (its `calibration` report),
so every learned method gets the same images, steps and recipe.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..models.config import SCORE_VARIANTS, ConfigError, MercuryConfig
from ..models.mercury import Mercury, build_mercury
from .calibrate import CalibSettings, Prefixed, calibrate, finish_vanilla
from .data import ImageSet


@dataclass(frozen=True)
class Method:
    name: str
    pruning: str
    reconstruction: str
    score: str | None = None     # None = the checkpoint's score


def method_grid(recon: str = "meta-local", which: str = "all", score: str = MercuryConfig.score) -> list[Method]:
    """`recon`: the checkpoint's (Mercury's) reconstruction, also paired with the pruning
    baselines. which: 'main' (vanilla + mercury), 'all', or a comma-separated list of names
    from the 'all' grid (vanilla and mercury always come first)."""
    grid = [Method("vanilla", "none", "none"), Method("mercury", "regional", recon)]
    if which == "main":
        return grid
    if which != "all":
        full = method_grid(recon, "all", score)
        wanted = {n.strip() for n in which.split(",") if n.strip()} - {"vanilla", "mercury", "main"}
        unknown = wanted - {m.name for m in full}
        if unknown:
            raise ConfigError(f"unknown method(s) {sorted(unknown)}; choose from 'all', 'main' or "
                              f"{[m.name for m in full[2:]]}")
        return grid + [m for m in full[2:] if m.name in wanted]
    for p in ("random", "topk-attn", "uniform", "janus"):
        grid.append(Method(f"{p}+{recon}", p, recon))
    grid.append(Method("evit", "topk-attn-fuse", "none"))
    for r in ("none", "zero", "duplicate", "mask", "generator", "meta-pos", "meta-ctx", "meta-local"):
        if r != recon:
            grid.append(Method(f"regional+{r}", "regional", r))
    for sc in SCORE_VARIANTS:
        if sc != score:
            grid.append(Method(f"score={sc}", "regional", recon, sc))
    return grid


def build_variant(base: Mercury, method: Method, keep_ratio: float) -> Mercury | None:
    """The method as a Mercury wrapper on the shared backbone; None if it cannot run at this K."""
    cfg = copy.deepcopy(base.cfg)
    cfg.pruning, cfg.reconstruction = method.pruning, method.reconstruction
    cfg.score = method.score or base.cfg.score
    cfg.keep_ratio, cfg.keep_tokens = keep_ratio, None
    try:
        return build_mercury(cfg, base.backbone)
    except ConfigError:
        return None


def prepare(base: Mercury, stored: dict[int, Mercury], methods: list[Method], keep_ratios: list[float],
            calib_train: Prefixed | None, settings: CalibSettings, progress: bool = True,
            log=print) -> list[tuple[Method, float, Mercury]]:
    """(method, keep ratio, ready model) for every runnable pair; calibrates what needs it."""
    ready = []
    for r in keep_ratios:
        for meth in methods:
            if meth.name == "vanilla":
                continue
            m = build_variant(base, meth, r)
            if m is None:
                log(f"skip {meth.name} at keep ratio {r}: not runnable at K={base.cfg.num_keep(base.num_patches)}")
                continue
            if meth.name == "mercury" and m.keep in stored:
                m = stored[m.keep]
            elif m.recon.learned:
                if calib_train is None:
                    raise ConfigError(f"{meth.name} at K={m.keep} needs calibration: pass train images")
                rep = calibrate(m, calib_train, settings, progress=progress)
                steps = (f", distillation loss {rep['train_loss_first']:.4f} -> {rep['train_loss_last']:.4f}"
                         if "train_loss_first" in rep else "")
                log(f"calibrated {meth.name} K={m.keep}: init {rep.get('init', 'default')}{steps} "
                    f"({rep['minutes']:.1f} min)")
            ready.append((meth, r, m))
    return ready


@torch.inference_mode()
def evaluate(base: Mercury, ready: list[tuple], images: ImageSet,
             batch_size: int = 256, progress: bool = True, codes_out: dict | None = None) -> list[dict]:
    """Top-1 of vanilla and every ready model; one prefix pass per batch shared by all.
    A ready entry (method, keep ratio, model, codec) sends its tokens through the codec
    (models/codec.py); codes_out, when given, collects {j: (codes, indices)} of those."""
    from tqdm import tqdm

    for item in ready:                          # same numbers on every call (random pruning)
        item[2]._gen.manual_seed(item[2].cfg.seed)
    codecs = [item[3] if len(item) > 3 else None for item in ready]
    collected = {j: ([], []) for j, c in enumerate(codecs, start=1) if c is not None}
    correct = torch.zeros(1 + len(ready), dtype=torch.long)
    base.record_attention()                     # one prefix pass for all: some methods read it
    for imgs, labels in tqdm(images.batches(batch_size), total=math.ceil(len(images) / batch_size),
                             desc=f"eval {len(ready) + 1} methods", disable=not progress):
        x, cls_attn = base.forward_prefix(imgs)
        cls_attn = cls_attn.clone()
        correct[0] += (finish_vanilla(base.backbone, base.finish_prune_block(x), base.prune_at).argmax(-1) == labels).sum()
        for j, item in enumerate(ready, start=1):
            m, codec = item[2], codecs[j - 1]
            tokens, idx = m.prune(x, cls_attn)
            if codec is not None:
                codes = codec.encode(tokens, idx)                        # (B, 1+K, d) uint8
                tokens = codec.decode(codes, idx)
                collected[j][0].append(codes), collected[j][1].append(idx)
            logits = m.forward_tail(tokens, idx)
            correct[j] += (logits.argmax(-1) == labels).sum()
    if codes_out is not None:
        codes_out.update({j: (torch.cat(c).numpy(), torch.cat(i).numpy()) for j, (c, i) in collected.items()})
    n = len(images)
    rows = [{"method": "vanilla", "pruning": "none", "reconstruction": "none", "keep_ratio": 1.0,
             "top1": correct[0].item() / n}]
    for j, item in enumerate(ready, start=1):
        meth, r, m = item[:3]
        rows.append({"method": meth.name, "pruning": m.cfg.pruning, "reconstruction": m.cfg.reconstruction,
                     "keep_ratio": float(r), "top1": correct[j].item() / n})
        if codecs[j - 1] is not None:
            rows[-1]["codec"] = codecs[j - 1].name
    return rows


def label(row: dict) -> str:
    """A row's name in the table and the plot (int8-token rows of `eval --onnx` share "mercury")."""
    return (row["method"] + (f" ({row['token_dtype']} tokens)" if row.get("token_dtype") else "")
            + (f" + codec {row['codec']}" if row.get("codec") else "")
            + (f" q{row['quality']}" if row.get("quality") is not None else ""))


def format_table(rows: list[dict]) -> str:
    ratios = sorted({r["keep_ratio"] for r in rows if r["method"] != "vanilla"}, reverse=True)
    names = list(dict.fromkeys(label(r) for r in rows))
    cell = {(label(r), r["keep_ratio"]): r["top1"] for r in rows}
    vanilla = cell.get(("vanilla", 1.0))
    head = f"{'method':<24}" + "".join(f"{'keep ' + format(k, 'g'):>12}" for k in ratios)
    lines = [head, "-" * len(head)]
    for name in names:
        if name == "vanilla":
            lines.append(f"{'vanilla':<24}" + "".join(f"{100 * vanilla:>11.2f}%" for _ in ratios))
            continue
        vals = [cell.get((name, k)) for k in ratios]
        lines.append(f"{name:<24}" + "".join(f"{100 * v:>11.2f}%" if v is not None else f"{'-':>12}" for v in vals))
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    vanilla = next((r["top1"] for r in rows if r["method"] == "vanilla"), None)
    if vanilla is not None:
        ax.axhline(100 * vanilla, color="black", ls="--", lw=1, label="vanilla")
    colors = plt.get_cmap("tab20").colors
    names = [n for n in dict.fromkeys(label(r) for r in rows) if n != "vanilla"]
    for j, name in enumerate(names):
        pts = sorted((r["keep_ratio"], 100 * r["top1"]) for r in rows if label(r) == name)
        mercury = name == "mercury"
        ax.plot(*zip(*pts), marker="o", lw=2.8 if mercury else 1.2, ls="-" if mercury or j % 2 else "--",
                color="black" if mercury else colors[j % len(colors)], label=name)
    ax.set_xlabel("keep ratio (fraction of patch tokens sent)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
