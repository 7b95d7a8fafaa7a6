"""Codec design choices on the reference model: which mean to subtract, how much variance d keeps.

    python benchmarks/codec_design.py [--json docs/results/codec/design.json]

Reference model (../shared/models/deit_tiny_patch4_32_cifar10.json), regional pruning after
block 1. The codec is fit on the head outputs of 1,000 CIFAR-10 train images and measured on
1,000 other train images (never test images): relative token error ||x_hat - x|| / ||x||
over the patch rows and over the CLS row, for the per-position mean (the cloud knows each
kept token's position: the mean carries the position embedding and what is typical there)
against one global mean, across (d, b).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mercury_onnx.export.images import load_images
from mercury_onnx.models.checkpoint import mercury_from_any
from mercury_onnx.models.codec import fit_codec

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared" / "models" / "deit_tiny_patch4_32_cifar10.json"
TRAIN = ROOT.parent / "shared" / "data" / "cifar10" / "train"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for keep in (0.5, 0.25):
        (m,) = mercury_from_any(str(REF), keep_ratios=[keep])
        x, _ = load_images(TRAIN, 2000, (32, 32), m.cfg.mean, m.cfg.std)
        outs = [m.forward_head(torch.from_numpy(x[s: s + 250])) for s in range(0, 2000, 250)]
        tok, idx = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        fit, test = slice(0, 1000), slice(1000, 2000)
        for d, b in [(8, 4), (12, 4), (16, 4), (24, 4), (16, 3), (16, 5), (16, 8), (32, 4)]:
            for mean in ("position", "global"):
                c = fit_codec(tok[fit], idx[fit], m.num_patches, d, b, mean)
                rt = c.roundtrip(tok[test], idx[test])
                r = {"keep_ratio": keep, "codec": f"{d}x{b}", "mean": mean, "variance_kept": round(c.variance_kept, 5),
                     "patch_error": round(rel(rt[:, 1:], tok[test][:, 1:]), 5),
                     "cls_error": round(rel(rt[:, :1], tok[test][:, :1]), 5)}
                rows.append(r)
                print(r, flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": str(REF.name), "fit": "1000 CIFAR-10 train images",
                                            "measured": "1000 other train images", "rows": rows}, indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
