"""Codec payload (formats/codec_wire.py) encode + decode time and bytes, DeiT-B geometry at keep 0.25.

    python benchmarks/codec_wire.py [--repeats 500] [--images 250] [--json docs/results/codec_wire/speed.json]
    python benchmarks/codec_wire.py --export DIR [--data DIR --skip N --images 250] [--json FILE]

The second form measures an export's own codecs (export --codec) instead: every codec head on
real images (the photos after the first --skip, i.e. not the ones the codec was fit on), mean
bytes on the wire with and without the export's zstd dictionary, against the codes' entropy.

Target (issue 13): encode + decode <= 1 ms for DeiT-B keep 0.25 (K = 49 of N = 196, 1 + K tokens).
The codes are real-photo statistics without a codec export: the 16x16x3 pixel patches of the
photos in ../shared/data/imagenet-sample (center-cropped to 224), projected onto their top-d
principal directions fitted on the first half, quantised to b bits with 0.5/99.5-percentile
ranges; the measured images are the second half, kept patches by patch variance. The zstd
dictionary is trained on the first half. Rounds are paired: each repeat times every (d, b)
with and without the dictionary, and the int8 token payload (runtime/codec.py) of the same
image for scale, so the ratios come from one run. Also prints bytes on the wire against the
codes' empirical-entropy bound (formats/codec_wire.entropy_bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from mercury_onnx.app import shown_path
from mercury_onnx.formats import codec_wire as w
from mercury_onnx.runtime import codec

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
N, K, P = 196, 49, 16
CODECS = [(32, 4), (64, 4), (128, 4), (128, 6), (192, 8)]
MID, CID = "0123456789abcdef", "c0dec0de"


def photo_patches(count: int) -> np.ndarray:
    """(M, 196, 768) pixel patches in [0, 1] of `count` photos, center-cropped to 224."""
    from PIL import Image

    from mercury_onnx.formats.images import resize_crop

    files = sorted(f for f in PHOTOS.iterdir() if f.suffix.lower() in (".jpeg", ".jpg"))[:count]
    x = np.stack([np.asarray(resize_crop(Image.open(f).convert("RGB"), 224, 224), np.float32) / 255 for f in files])
    m = len(x)
    return x.reshape(m, 14, P, 14, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(m, N, P * P * 3)


def make_codes(fit: np.ndarray, test: np.ndarray, d: int, bits: int):
    """PCA d dims + uniform b-bit quantiser fitted on `fit`; codes (M, 1+K, d) and indices of `test`."""
    flat = fit.reshape(-1, fit.shape[-1])
    mean = flat.mean(0)
    _, s, vt = np.linalg.svd(flat[::4] - mean, full_matrices=False)
    basis = vt[:d].T
    y_fit = (flat - mean) @ basis
    lo, hi = np.percentile(y_fit, 0.5, 0), np.percentile(y_fit, 99.5, 0)
    kept_var = float((s[:d] ** 2).sum() / (s ** 2).sum())

    def quant(x):
        y = (x - mean) @ basis                                             # (M, N, d)
        idx = np.sort(np.argsort(-x.var(-1), 1)[:, :K], 1)                 # (M, K)
        t = np.concatenate([y.mean(1, keepdims=True), np.take_along_axis(y, idx[..., None], 1)], 1)
        q = np.clip(np.rint((t - lo) / (hi - lo) * (2 ** bits - 1)), 0, 2 ** bits - 1)
        return q.astype(np.uint8), idx.astype(np.int64)

    return quant(fit), quant(test), kept_var


def export_rows(export_dir: Path, data: Path, skip: int, count: int) -> list[dict]:
    """Bytes on the wire vs the entropy bound for every codec of an export, on real images."""
    from mercury_onnx.formats.manifest import load_manifest
    from mercury_onnx.runtime.bench import sample_images
    from mercury_onnx.runtime.head import Head
    from mercury_onnx.formats.images import preprocess

    m = load_manifest(export_dir)
    files = sample_images(data, count, skip)
    x = preprocess(files, m["preprocess"])                               # (M, 3, H, W)
    n, rows = m["num_patches"], []
    for v in m["variants"]:
        for c in v.get("codecs") or []:
            head = Head(export_dir, v["keep_ratio"], manifest=m, codec=c["name"])
            out = [head(x[i:i + 16]) for i in range(0, len(x), 16)]
            codes = np.concatenate([o["codes"] for o in out])
            idx = np.concatenate([o["indices"] for o in out])
            dic = w.load_dictionary(export_dir, c)
            row = dict(export=m["timm_model"], keep_ratio=v["keep_ratio"], codec=c["name"], images=len(x),
                       variance_kept=c.get("variance_kept"), entropy_bytes=round(w.entropy_bytes(codes, c["bits"]), 1),
                       raw_bits_bytes=w.packed_size(codes[0].size, c["bits"]))
            for dk, d in (("plain", None), ("dict", dic)):
                sizes = [len(w.encode(codes[i:i + 1], idx[i:i + 1], n, c["bits"], m["model_id"], c["codec_id"], d))
                         for i in range(len(codes))]
                row[f"bytes_{dk}"] = round(float(np.mean(sizes)), 1)
            fixed = w.read_header(w.encode(codes[:1], idx[:1], n, c["bits"], m["model_id"], c["codec_id"])).size \
                + (n + 7) // 8
            row["header_mask_bytes"] = fixed
            row["gap_bytes_dict"] = round(row["bytes_dict"] - fixed - row["entropy_bytes"], 1)
            rows.append(row)
            print(f"{row['export']:24} r={row['keep_ratio']:<5} {c['name']:6} var {row['variance_kept']} | raw bits "
                  f"{row['raw_bits_bytes']} B, wire {row['bytes_plain']} B, with dictionary {row['bytes_dict']} B "
                  f"(header+mask {fixed} B), entropy {row['entropy_bytes']} B, gap {row['gap_bytes_dict']} B")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=None, help="measure this export's codecs instead")
    ap.add_argument("--data", type=Path, default=PHOTOS, help="with --export: real images")
    ap.add_argument("--skip", type=int, default=250, help="with --export: leave out the first N (the fit photos)")
    ap.add_argument("--repeats", type=int, default=500)
    ap.add_argument("--images", type=int, default=250, help="photos, half to fit, half to measure")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.export:
        rows = export_rows(args.export, args.data, args.skip, args.images)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(command=f"python benchmarks/codec_wire.py --export EXPORTS_DIR/{args.export.name} "
                                                         f"--data {shown_path(args.data)} --skip {args.skip} --images {args.images}",
                                                 rows=rows), indent=1))
        return
    if not PHOTOS.is_dir():
        raise SystemExit(f"photos not found: {PHOTOS}")
    patches = photo_patches(args.images)
    half = len(patches) // 2
    fit, test = patches[:half], patches[half:]
    tokens = np.random.default_rng(0).standard_normal((1, 1 + K, 768)).astype(np.float32)
    cases = []
    for d, b in CODECS:
        (fc, _), (tc, ti), kept = make_codes(fit, test, d, b)
        dic = w.train_dictionary(fc, b)
        cases.append(dict(codec=f"{d}x{b}", d=d, bits=b, codes=tc, idx=ti, dic=dic, kept=kept,
                          entropy=w.entropy_bytes(tc, b)))
    print(f"load: {os.getloadavg()[0]:.2f} (1-min), {os.cpu_count()} cores; DeiT-B geometry N={N}, K={K}, "
          f"1+K tokens; {len(test)} measured photos, {half} fit photos")
    times = {(c["codec"], dk): [] for c in cases for dk in ("plain", "dict")}
    times["int8 tokens"] = []
    sizes = {k: [] for k in times}
    for r in range(args.repeats):
        j = r % len(test)
        for c in cases:
            for dk, dic in (("plain", None), ("dict", c["dic"])):
                codes, idx = c["codes"][j:j + 1], c["idx"][j:j + 1]
                t0 = time.perf_counter()
                data = w.encode(codes, idx, N, c["bits"], MID, CID, dic)
                _, back, _ = w.decode(data, model_id=MID, codec_id=CID, dictionary=dic)
                times[(c["codec"], dk)].append(time.perf_counter() - t0)
                sizes[(c["codec"], dk)].append(len(data))
                assert np.array_equal(back, codes)
        t0 = time.perf_counter()
        data = codec.encode(tokens, c["idx"][j:j + 1], model_id=MID, keep_ratio=K / N, num_patches=N, token_dtype="int8")
        codec.decode(data, expect_model_id=MID)
        times["int8 tokens"].append(time.perf_counter() - t0)
        sizes["int8 tokens"].append(len(data))
    base = np.median(times["int8 tokens"])
    rows = []
    print("bytes = mean on the wire; entropy = the codes' per-channel order-0 bound; gap = bytes - header - mask - entropy")
    print(f"{'codec':8} {'dict':5} {'var kept':>8} {'bytes':>7} {'entropy':>8} {'gap':>6} {'enc+dec p50':>12} "
          f"{'p99':>8} {'vs int8 tok':>11}  target 1 ms")
    for c in cases:
        for dk in ("plain", "dict"):
            t = np.array(times[(c["codec"], dk)]) * 1e3
            mean_b = float(np.mean(sizes[(c["codec"], dk)]))
            fixed = w.read_header(w.encode(c["codes"][:1], c["idx"][:1], N, c["bits"], MID, CID)).size + (N + 7) // 8
            row = dict(codec=c["codec"], dictionary=dk == "dict", variance_kept=round(c["kept"], 4),
                       bytes=round(mean_b, 1), entropy_bytes=round(c["entropy"], 1),
                       header_mask_bytes=fixed, gap_bytes=round(mean_b - fixed - c["entropy"], 1),
                       p50_ms=round(float(np.median(t)), 4), p99_ms=round(float(np.percentile(t, 99)), 4),
                       ratio_vs_int8_tokens=round(float(np.median(t)) / (base * 1e3), 2))
            rows.append(row)
            print(f"{c['codec']:8} {dk:5} {c['kept']:8.3f} {mean_b:7.1f} {c['entropy']:8.1f} {row['gap_bytes']:6.1f} "
                  f"{row['p50_ms']:9.3f} ms {row['p99_ms']:5.3f} ms {row['ratio_vs_int8_tokens']:10.2f}x  "
                  f"{'ok' if row['p50_ms'] <= 1 else 'MISS'}")
    print(f"int8 tokens {np.mean(sizes['int8 tokens']):.0f} bytes, enc+dec p50 {base * 1e3:.3f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            command="python benchmarks/codec_wire.py" + (f" --repeats {args.repeats} --images {args.images}"),
            load_1min=os.getloadavg()[0], geometry=dict(N=N, K=K, tokens=1 + K), source="imagenet-sample pixel patches",
            int8_tokens=dict(bytes=float(np.mean(sizes["int8 tokens"])), p50_ms=round(base * 1e3, 4)), rows=rows), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
