"""Markdown tables of the codec results from their JSON (docs/results/codec.md is built from these).

    python benchmarks/codec_report.py docs/results/codec/rate_curve.json [more eval/benchmark JSON ...]
    python benchmarks/codec_report.py --merge OUT.json [--plot OUT.png] A.json B.json ...

--merge joins the rows of several `eval --rate-curve` JSON files of the same test images
(e.g. the Mercury rows and the image-codec rows, run as two processes) into one, without
repeating a (method, keep, codec, quality) row; --plot draws it (calib/ratecurve.plot_rate).

Understands `eval --rate-curve` JSON (rows with payload_bytes), benchmarks/codec_photos.py,
benchmarks/codec_head.py and benchmarks/codec_design.py output. For a rate curve it also
checks the issue-13 rate-accuracy criteria on the rows present and prints each as met/missed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rate_table(d: dict) -> str:
    rows = d["results"]
    out = [f"{d['dataset']}, {d['images']} images", "",
           "| method | keep | codec / quality | bytes on the wire | top-1 | entropy bound (codes) | no dictionary |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["method"] not in ("vanilla", "mercury"), r["method"], -r["keep_ratio"],
                                         r.get("payload_bytes") or 0)):
        what = r.get("codec") or (f"q{r['quality']}" if r.get("quality") is not None else
                                  ("int8 tokens" if r["method"] == "mercury" else "stored file"))
        out.append(f"| {r['method']} | {r['keep_ratio']:g} | {what} | {r.get('payload_bytes', float('nan')):.0f} | "
                   f"{100 * r['top1']:.2f} | {r.get('entropy_bytes', '')} | {r.get('payload_bytes_no_dictionary', '')} |")
    return "\n".join(out)


def criteria(d: dict) -> str:
    rows = d["results"]
    merc = [r for r in rows if r["method"] == "mercury" and r.get("codec")]
    lines = []

    def best(limit):   # best top-1 among Mercury codec points at <= limit bytes
        ok = [r for r in merc if r["payload_bytes"] <= limit]
        return max(ok, key=lambda r: r["top1"]) if ok else None

    for keep, limit in ((0.5, 400), (0.25, 250)):
        plain = next((r for r in rows if r["method"] == "mercury" and not r.get("codec") and r["keep_ratio"] == keep), None)
        pts = [r for r in merc if r["keep_ratio"] == keep and r["payload_bytes"] <= limit]
        if plain and pts:
            b = max(pts, key=lambda r: r["top1"])
            gap = 100 * (plain["top1"] - b["top1"])
            lines.append(f"- keep {keep}: {b['codec']} {b['payload_bytes']:.0f} B, top-1 {100 * b['top1']:.2f} vs "
                         f"uncompressed {100 * plain['top1']:.2f} ({-gap:+.2f} pt): "
                         f"{'met' if gap <= 0.5 else 'MISSED'} (within 0.5 pt at <= {limit} B)")
    for r in sorted((r for r in rows if r["method"] in ("jpeg", "webp")), key=lambda r: (r["method"], r["quality"])):
        factor = 0.7 if r["method"] == "webp" and r["quality"] in (30, 50, 75) else 1.0
        if r["method"] == "jpeg" and r["quality"] == 95:
            factor = 1.0
        b = best(factor * r["payload_bytes"])
        ok = b is not None and b["top1"] >= r["top1"]
        tag = "reported" if r["method"] == "jpeg" and r["quality"] == 95 else ("met" if ok else "MISSED")
        lines.append(f"- {r['method']} q{r['quality']} ({r['payload_bytes']:.0f} B, {100 * r['top1']:.2f}): best Mercury "
                     f"at <= {factor:g}x its bytes: "
                     + (f"keep {b['keep_ratio']:g} {b['codec']} {b['payload_bytes']:.0f} B {100 * b['top1']:.2f}" if b else "none")
                     + f" -> {tag}")
    return "\n".join(lines)


def photos_table(d: dict) -> str:
    out = [f"{d['model']} ({d['weights']}), keep {d['keep_ratio']} (K={d['keep_tokens']} of N={d['num_patches']}), "
           f"fit on {d['fit_photos']} photos, measured on {d['measured_photos']}. JPEG q90 of the 224 crop: "
           f"{d['jpeg_q90_bytes']:.0f} B, token error {d['jpeg_q90_token_error']:.4f}; int8 tokens {d['int8_token_bytes']} B.",
           "", "| codec | channels | variance kept | token error | bytes | x JPEG q90 bytes | error <= JPEG q90 "
           "| codes' entropy B | wire enc+dec ms (p50 / p99) |",
           "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for p in d["points"]:
        ms = f"{p['wire_ms']:.3f} / {p['wire_ms_p99']:.3f}" if "wire_ms_p99" in p else "-"
        out.append(f"| {p['codec']} | {p['dims']} | {p['variance_kept']:.4f} | {p['token_error']:.4f} | "
                   f"{p['payload_bytes']:.0f} | {p['vs_jpeg_q90_bytes']:.3f} | {'yes' if p['error_le_jpeg_q90'] else 'no'} | "
                   f"{p.get('entropy_bytes', float('nan')):.0f} | {ms} |")
    eq, rd = d.get("equal_step_at_jpeg_error"), d.get("water_filling_at_jpeg_error")
    if eq:   # not wire formats: a measured prototype quantiser and a modelled bound, at JPEG q90's error
        out.append(f"| equal step on all channels, per-channel entropy code lengths (prototype) | {d['dim']} | 1.0000 | "
                   f"{eq['token_error']:.4f} | {eq['with_header_mask']:.0f} | {eq['vs_jpeg_q90_bytes']:.3f} | yes | - | - |")
    if rd:
        out.append(f"| Gaussian rate-distortion bound (modelled) | {rd['channels_coded']} | - | "
                   f"{d['jpeg_q90_token_error']:.4f} | {rd['with_header_mask']:.0f} | {rd['vs_jpeg_q90_bytes']:.3f} | - | - | - |")
    return "\n".join(out)


def head_table(d: dict) -> str:
    out = ["| model | keep | codec | plain head ms | codec head ms | added (median of paired ratios) | 4-block range |",
           "|---|---:|---|---:|---:|---:|---|"]
    for r in d["rows"]:
        lo, hi = r["added_share_block_range"]
        out.append(f"| {r['model'].split('/')[-1]} | {r['keep_ratio']} | {r['codec']} | {r['plain_head_ms']:.3f} | "
                   f"{r['codec_head_ms']:.3f} | {100 * r['added_share']:+.2f}% | {100 * lo:+.2f}..{100 * hi:+.2f}% |")
    return "\n".join(out) + f"\n\nload average during the run: {', '.join(f'{x:.1f}' for x in d['loadavg'])}"


def design_table(d: dict) -> str:
    out = ["| keep | codec | mean | variance kept | patch token error | CLS error |", "|---:|---|---|---:|---:|---:|"]
    for r in d["rows"]:
        out.append(f"| {r['keep_ratio']} | {r['codec']} | {r['mean']} | {r['variance_kept']:.4f} | "
                   f"{r['patch_error']:.4f} | {r['cls_error']:.4f} |")
    return "\n".join(out)


def merge(paths: list[str]) -> dict:
    parts = [json.load(open(p)) for p in paths]
    if len({(d["dataset"], d["images"]) for d in parts}) != 1:
        raise SystemExit(f"{paths}: not the same test images; refusing to merge")
    seen, rows = set(), []
    for d in parts:
        for r in d["results"]:
            key = (r["method"], r["keep_ratio"], r.get("codec"), r.get("quality"))
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return {"dataset": parts[0]["dataset"], "images": parts[0]["images"],
            "merged_from": [Path(p).name for p in paths], "results": rows}


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--merge":
        out, args = args[1], args[2:]
        plot = None
        if args and args[0] == "--plot":
            plot, args = args[1], args[2:]
        d = merge(args)
        open(out, "w").write(json.dumps(d, indent=1))
        print(f"wrote {out}")
        if plot:
            from mercury_onnx.calib.ratecurve import plot_rate
            plot_rate(d["results"], plot, title=f"reference model (deit_tiny_patch4_32_cifar10) on {d['dataset']} "
                      f"({d['images']} images): top-1 vs bytes on the wire")
            print(f"wrote {plot}")
        args = [out]
    for path in args:
        d = json.load(open(path))
        print(f"### {path}\n")
        if "results" in d:
            print(rate_table(d) + "\n\n" + criteria(d))
        elif "points" in d:
            print(photos_table(d))
        elif "rows" in d and "loadavg" in d:
            print(head_table(d))
        elif "rows" in d:
            print(design_table(d))
        print()


if __name__ == "__main__":
    main()
