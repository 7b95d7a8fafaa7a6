"""Tried, not kept: block 1's attention as onnxruntime's fused `com.microsoft` `Attention` op in
both prune points' heads, against the plain heads the exporter writes (issue 14, acceptance 2).

    python benchmarks/fused_attention.py [--models deit_base_patch16_224 ...] [--keep-ratio 0.25]
        [--reps 300] [--json docs/results/fused_attention.json]

For each model the `block` and `attn` heads (benchmarks/prune_point.py's `both_points`: the
same backbone, random weights at 224 px) are exported twice: as the exporter writes them, and
with block 1's timm Attention swapped (ToMe-style, for the export only) for one whose ONNX is a
single `Attention` node (QKV projection, softmax and weighted sum in one kernel; stock
onnxruntime has it on CPU). The fused heads must give the plain heads' indices and tokens within
1e-5 on the input, or the script stops. Then all four run in paired rounds (export_latency's
`interleaved`, cold: once per round, 1 thread, process CPU time): attn / block with both plain
and with both fused, and each fused head / its plain one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Attention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from export_latency import interleaved, paired  # noqa: E402
from prune_point import both_points  # noqa: E402

from mercury_onnx.export import graphs as G  # noqa: E402
from mercury_onnx.export.convert import export_onnx  # noqa: E402
from mercury_onnx.export.validate import session  # noqa: E402

ATOL = 1e-5


class AttentionOp(torch.autograd.Function):
    """x (B, N, D) @ w (D, 3D) + b, then multi-head softmax attention -> (B, N, D); exports as
    com.microsoft Attention (its weight layout is timm's qkv weight transposed)."""

    @staticmethod
    def forward(ctx, x, w, b, heads):
        B, N, D = x.shape
        q, k, v = (x @ w + b).view(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)   # (B, H, N, D/H) each
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)

    @staticmethod
    def symbolic(g, x, w, b, heads):
        return g.op("com.microsoft::Attention", x, w, b, num_heads_i=heads)


class FusedAttention(Attention):
    def forward(self, x, attn_mask=None, is_causal=False):
        return self.proj(AttentionOp.apply(x, self.qkv.weight.t().contiguous(), self.qkv.bias, self.num_heads))


@contextlib.contextmanager
def fused_block1(m):
    attn = m.backbone.blocks[0].attn
    if type(attn) is not Attention:
        raise SystemExit(f"block 1's attention is {type(attn).__name__}, not plain timm Attention: nothing to fuse")
    attn.__class__ = FusedAttention
    try:
        yield
    finally:
        attn.__class__ = Attention


def bench(source: str, keep_ratio: float, reps: int, tmp: Path) -> dict:
    block, attn, x = both_points(source, keep_ratio)
    files = {}
    for name, m in (("block", block), ("attn", attn)):
        files[name] = tmp / f"{name}.onnx"
        export_onnx(G.HeadGraph(m), (x,), files[name], *G.HEAD_IO)
        with fused_block1(m):
            files[f"{name}_fused"] = tmp / f"{name}_fused.onnx"
            export_onnx(G.HeadGraph(m), (x,), files[f"{name}_fused"], *G.HEAD_IO)
    sessions = {name: session(f, 1) for name, f in files.items()}
    feed = {"images": x.numpy()}
    diffs = {}
    for name in ("block", "attn"):
        (tok, idx), (ftok, fidx) = sessions[name].run(None, feed), sessions[f"{name}_fused"].run(None, feed)
        diffs[name] = float(np.abs(ftok - tok).max())
        if not (fidx == idx).all() or diffs[name] > ATOL:
            raise SystemExit(f"{source} {name}: the fused head differs from the plain one (indices equal: "
                             f"{bool((fidx == idx).all())}, max|token diff| {diffs[name]:.2e} > {ATOL:g})")
    times = interleaved({name: (lambda s: lambda: s.run(None, feed))(s) for name, s in sessions.items()}, reps, warmup=5)
    ratio = lambda a, b: list(paired(times[a], times[b], lambda u, v: u / v))   # noqa: E731
    return {"model": Path(source).stem, "keep_ratio": keep_ratio, "K": block.keep, "rounds": reps,
            "max_token_diff": diffs, "attn_vs_block_plain": ratio("attn", "block"),
            "attn_vs_block_fused": ratio("attn_fused", "block_fused"),
            "block_fused_vs_plain": ratio("block_fused", "block"), "attn_fused_vs_plain": ratio("attn_fused", "attn")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deit_base_patch16_224", "deit_small_patch16_224"])
    ap.add_argument("--keep-ratio", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=300, help="paired rounds per model")
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "fused_attention.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load, rows = os.getloadavg(), []
    with tempfile.TemporaryDirectory() as tmp:
        for src in args.models:
            r = bench(src, args.keep_ratio, args.reps, Path(tmp))
            rows.append(r)
            print(f"{r['model']} keep {args.keep_ratio:g}: attn/block plain {r['attn_vs_block_plain'][0]:.3f}, fused "
                  f"{r['attn_vs_block_fused'][0]:.3f}; fused/plain block {r['block_fused_vs_plain'][0]:.3f}, attn "
                  f"{r['attn_fused_vs_plain'][0]:.3f} (tokens within {max(r['max_token_diff'].values()):.1e})", flush=True)
    out = {"command": "python benchmarks/fused_attention.py " + " ".join(sys.argv[1:]),
           "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU",
           "loadavg_start": load, "loadavg_end": os.getloadavg(),
           "onnxruntime": __import__("onnxruntime").__version__, "threads": 1, "batch": 1,
           "timer": "process CPU time", "ratios": "[median over paired rounds, lowest and highest median of 4 blocks of rounds]", "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
