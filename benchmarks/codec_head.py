"""What the codec's projection + quantisation adds to the head: paired rounds, one run.

    python benchmarks/codec_head.py [--reps 300] [--json docs/results/codec/head_time.json]

For each (model, keep ratio, codec): the plain head (images -> float tokens, indices) and the
codec head (the same + subtract mean, project to d dims, quantise to b bits -> uint8 codes)
are exported here (onnxruntime, CPU, one thread, batch 1) and timed round-robin in a new
random order every round as process CPU time (export_latency.interleaved). Printed: median
ms of each and the median over rounds of codec/plain - 1 (the share the projection adds),
with its range over 4 blocks of rounds. Target (issue 13): <= 3%.
Codecs are fit on real images (CIFAR-10 train for the reference model; for DeiT-B, random
weights made trained-like by export_latency.trained_like, the imagenet-sample photos), and run
on one real image.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from export_latency import interleaved, paired, trained_like  # noqa: E402

from mercury_onnx.export import graphs as G  # noqa: E402
from mercury_onnx.export.convert import export_onnx  # noqa: E402
from mercury_onnx.export.images import load_images  # noqa: E402
from mercury_onnx.export.validate import session  # noqa: E402
from mercury_onnx.models.checkpoint import mercury_from_any  # noqa: E402
from mercury_onnx.models.codec import fit_named  # noqa: E402

SHARED = ROOT.parent / "shared"
CASES = [("../shared/models/deit_tiny_patch4_32_cifar10.json", 0.5, "16x4"),
         ("../shared/models/deit_tiny_patch4_32_cifar10.json", 0.25, "16x4"),
         ("deit_base_patch16_224", 0.25, "128x4"),
         ("deit_base_patch16_224", 0.25, "e6.6")]


def images_for(m, n: int, offset: int = 0) -> np.ndarray:
    h, w = m.backbone.patch_embed.img_size
    if h == 32:
        x, _ = load_images(SHARED / "data/cifar10/train", n, (h, w), m.cfg.mean, m.cfg.std, offset=offset)
        return x
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from codec_photos import photos

    imgs = np.stack(photos()[offset: offset + n]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    mean = np.asarray(m.cfg.mean or (0.485, 0.456, 0.406), np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(m.cfg.std or (0.229, 0.224, 0.225), np.float32).reshape(1, 3, 1, 1)
    return (imgs - mean) / std


def bench(source: str, keep: float, name: str, reps: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    (m,) = mercury_from_any(source, keep_ratios=[keep])
    trained_like(m)
    fit = torch.from_numpy(images_for(m, 250 if m.num_patches > 64 else 1000))
    with torch.no_grad():
        outs = [m.forward_head(fit[s: s + 50]) for s in range(0, len(fit), 50)]
    codec = fit_named(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), m.num_patches, name)
    x = torch.from_numpy(images_for(m, 1, offset=len(fit)))
    tag = f"{Path(source).stem}_k{m.keep}_{name}"
    export_onnx(G.HeadGraph(m), (x,), tmp / f"{tag}_plain.onnx", *G.HEAD_IO)
    export_onnx(G.CodecHead(m, codec), (x,), tmp / f"{tag}_codec.onnx", *G.CODEC_HEAD_IO)
    plain, coded = session(tmp / f"{tag}_plain.onnx", 1), session(tmp / f"{tag}_codec.onnx", 1)
    xn = x.numpy()
    t = interleaved({"plain": lambda: plain.run(None, {"images": xn}),
                     "codec": lambda: coded.run(None, {"images": xn})}, reps, warmup=5)
    share, lo, hi = paired(t["codec"], t["plain"], lambda a, b: a / b - 1)
    row = {"model": source, "keep_ratio": keep, "keep_tokens": m.keep, "codec": name,
           "plain_head_ms": round(1e3 * float(np.median(t["plain"])), 4),
           "codec_head_ms": round(1e3 * float(np.median(t["codec"])), 4),
           "added_share": round(share, 4), "added_share_block_range": [round(lo, 4), round(hi, 4)],
           "projection_flops": codec.extra_flops(m.keep), "reps": reps}
    print(f"{tag}: plain {row['plain_head_ms']:.3f} ms, codec {row['codec_head_ms']:.3f} ms, "
          f"added {100 * share:+.2f}% (blocks {100 * lo:+.2f}..{100 * hi:+.2f}%)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run only the cases whose codec is this (e.g. e6.6)")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    rows = [bench(s, k, c, a.reps, tmp) for s, k, c in CASES if a.only in (None, c)]
    if a.json:
        import os
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"rows": rows, "loadavg": os.getloadavg(),
                                            "timing": "process CPU time, paired rounds, ORT CPU 1 thread, batch 1"},
                                           indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
