"""Pruning cost of several exported heads of one model, measured side by side: e.g. the head of
the current code against one exported at an older commit.

    .venv/bin/python benchmarks/head_ab.py MODEL [--heads old=/tmp/old/head.onnx ...] [--reps 300]

MODEL is what benchmarks/export_latency.py takes (timm name or backbone JSON). The head of the
current code and the head without pruning are exported here; every head given with --heads
(same model, same keep ratio, images (1,3,H,W) -> tokens, indices) joins them. All of them and
the torch eager head run round-robin (new random order each round) at batch 1, one thread,
timed as process CPU time, as in export_latency.py; printed: median ms of each, and each head's
pruning cost (the median over rounds of head - head without pruning in the same round, and its
range over 4 blocks of rounds) in us and as a share of the head.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from export_latency import HeadNoPrune, interleaved, paired, trained_like  # noqa: E402

from mercury_onnx.export import graphs as G  # noqa: E402
from mercury_onnx.export.convert import export_onnx  # noqa: E402
from mercury_onnx.export.validate import session  # noqa: E402
from mercury_onnx.models.checkpoint import mercury_from_any  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--heads", nargs="*", default=[], help="NAME=PATH of other exported heads")
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = mercury_from_any(args.model, keep_ratios=[args.keep_ratio])[0]
    trained_like(m)
    h, w = m.backbone.patch_embed.img_size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp())
    export_onnx(G.HeadGraph(m), (x,), tmp / "head.onnx", *G.HEAD_IO)
    export_onnx(HeadNoPrune(m), (x,), tmp / "noprune.onnx", ["images"], ["tokens"])
    files = {"noprune": tmp / "noprune.onnx", "current": tmp / "head.onnx"}
    files.update(dict(h.split("=", 1) for h in args.heads))
    sessions = {k: session(f, 1) for k, f in files.items()}
    xn = x.numpy()

    def torch_head():
        with torch.no_grad():
            m.forward_head(x)

    fns = {"torch": torch_head, **{k: (lambda s: lambda: s.run(None, {"images": xn}))(s) for k, s in sessions.items()}}
    times = interleaved(fns, args.reps, warmup=5)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{Path(args.model).stem}: {args.reps} interleaved rounds, medians: torch head {1e3 * med['torch']:.2f} ms, "
          f"head without pruning {1e3 * med['noprune']:.3f} ms")
    for k in files:
        if k != "noprune":
            extra, lo, hi = paired(times[k], times["noprune"], lambda a, b: a - b)
            print(f"  {k:10s} head {1e3 * med[k]:.3f} ms, pruning +{1e6 * extra:.0f} us (blocks {1e6 * lo:.0f}-{1e6 * hi:.0f}) "
                  f"= {100 * extra / med[k]:.1f}% of the head")


if __name__ == "__main__":
    main()
