"""Token payload encode + decode time for DeiT-B at K=49 (50 x 768 tokens), per token dtype.

    python benchmarks/codec.py [--repeats 2000]

Target: encode + decode <= 0.3 ms. Prints the median and p99 time and the size ratio
against the raw float32 tokens + int64 indices. Tokens are random normal (the time does not
depend on the values), indices a sorted random subset of N = 196.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from mercury_onnx.runtime import codec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the table as JSON (e.g. docs/results/codec_bench.json)")
    args = ap.parse_args()
    n, k, d, b = 196, 49, 768, args.batch
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((b, 1 + k, d)).astype(np.float32)
    indices = np.sort(np.stack([rng.choice(n, k, replace=False) for _ in range(b)]), 1).astype(np.int64)
    raw = tokens.nbytes + indices.nbytes
    print(f"DeiT-B, K={k} of N={n}, D={d}, batch {b}: raw fp32 tokens + int64 indices = {raw} bytes")
    print(f"{'dtype':6} {'bytes':>7} {'ratio':>6} {'encode p50':>11} {'decode p50':>11} {'enc+dec p50':>12} "
          f"{'enc+dec p99':>12}  target 0.3 ms")
    rows = []
    for dtype in ("fp16", "int8", "fp32"):
        kw = dict(model_id="0123456789abcdef", keep_ratio=k / n, num_patches=n, token_dtype=dtype)
        enc, dec = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            data = codec.encode(tokens, indices, **kw)
            t1 = time.perf_counter()
            codec.decode(data, expect_model_id=kw["model_id"])
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        enc, dec = np.array(enc) * 1e3, np.array(dec) * 1e3
        tot = enc + dec
        verdict = "ok" if np.median(tot) <= 0.3 else "MISS"
        print(f"{dtype:6} {len(data):7d} {raw / len(data):5.2f}x {np.median(enc):8.3f} ms {np.median(dec):8.3f} ms "
              f"{np.median(tot):9.3f} ms {np.percentile(tot, 99):9.3f} ms  {verdict}")
        rows.append([dtype, len(data), f"{raw / len(data):.2f}x", f"{np.median(enc):.3f}", f"{np.median(dec):.3f}",
                     f"{np.median(tot):.3f}", f"{np.percentile(tot, 99):.3f}", verdict])
    if args.json:   # rendered by benchmarks/tables.py (`rows`, key=table)
        Path(args.json).write_text(json.dumps({
            "model": f"DeiT-B, K={k} of N={n}, D={d}, batch {b}", "raw_bytes": raw, "repeats": args.repeats,
            "load_average_end": round(os.getloadavg()[0], 1),
            "table": {"columns": ["dtype", "bytes", "vs raw", "encode p50 ms", "decode p50 ms", "enc+dec p50 ms",
                                  "enc+dec p99 ms", "target 0.3 ms"], "rows": rows}}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
