"""How closely each score proxy reproduces `block`'s selection at the prune point `attn`.

    python benchmarks/score_proxy_overlap.py [--images 2000] [--json docs/results/score_proxy_overlap.json]

The reference model (the shipped calibration's backbone; the selection does not read the
meta-parameters). Each proxy is fit as `calibrate` fits it (pruning.fit_score_proxy, up to
65,536 token rows) on the post-attention tokens of real CIFAR-10 train images; then, on as
many real test images, the overlap of its regional selection with the one `block` makes on
the whole block's output (x + mlp(norm2(x))): |kept ∩ kept_block| / K, averaged over images,
at keep 0.5 and 0.25. "plain" scores the post-attention stream as it is (no proxy).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mercury_onnx.export.images import load_images  # noqa: E402
from mercury_onnx.models import build_mercury  # noqa: E402
from mercury_onnx.models import pruning as P  # noqa: E402
from mercury_onnx.models.checkpoint import mercury_from_any  # noqa: E402
from mercury_onnx.models.config import MercuryConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cifar10"
PROXIES = [("plain", None, 0), ("linear", "linear", 32), ("linear", "linear", 192), ("gelu", "gelu", 32),
           ("gelu", "gelu", 64)]


def prefix(m, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([m.forward_prefix(images[i: i + 250])[0] for i in range(0, len(images), 250)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="train images to fit on, and test images to compare on")
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "score_proxy_overlap.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    base = mercury_from_any("reference", keep_ratios=[0.5])[0]
    cfg = copy.deepcopy(base.cfg)
    cfg.prune_point, cfg.score_proxy_rank = "attn", 0
    attn = build_mercury(cfg, base.backbone)                 # no proxy: the prefix is the post-attention stream
    train, _ = load_images(SHARED / "train", args.images, (32, 32), cfg.mean, cfg.std)
    test, _ = load_images(SHARED / "test", args.images, (32, 32), cfg.mean, cfg.std)
    x_train, x_test = prefix(attn, torch.from_numpy(train)), prefix(attn, torch.from_numpy(test))
    blk = attn.prune_block
    with torch.no_grad():
        whole = x_test + blk.mlp(blk.norm2(x_test))          # what `block` scores
    streams, fits = {}, {}
    for name, kind, rank in PROXIES:
        label = name if kind is None else f"{name} {rank}"
        if kind is None:
            streams[label] = x_test
            continue
        proxy = P.ScoreProxy(attn.dim, rank, kind)
        fits[label] = P.fit_score_proxy(proxy, x_train, blk.norm2, blk.mlp)
        with torch.no_grad():
            streams[label] = proxy(x_test, blk.norm2)
    rows, p = [], attn.num_prefix_tokens
    for keep in (0.5, 0.25):
        k = MercuryConfig(**{**cfg.to_dict(), "keep_ratio": keep, "keep_tokens": None}).num_keep(attn.num_patches)

        def kept(stream):   # (M, N) 0/1: the regional selection on this stream (attn has no proxy: as is)
            with torch.no_grad():
                idx = attn.regional_rows(stream, None, k)[:, p:, 0] - p
            return torch.zeros(len(idx), attn.num_patches).scatter_(1, idx, 1)

        ref = kept(whole)
        row = {"keep_ratio": keep, "K": k}
        for label, s in streams.items():
            row[label] = round(float((kept(s) * ref).sum() / ref.sum()), 4)
        rows.append(row)
        print(f"keep {keep:g} (K={k}): " + ", ".join(f"{label} {row[label]:.3f}" for label in streams), flush=True)
    out = {"command": "python benchmarks/score_proxy_overlap.py " + " ".join(sys.argv[1:]),
           "model": "reference (deit_tiny_patch4_32_cifar10, the shipped calibration's backbone)",
           "fit_images": f"{args.images} of cifar10/train", "test_images": f"{args.images} of cifar10/test",
           "fits": fits, "rows": rows, "minutes": round((time.time() - t0) / 60, 1)}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
