"""Markdown tables in docs/results/*.md, generated from the JSON beside them.

A table lives between two markers that name its JSON (relative to docs/results/) and the
renderer that turns that JSON into Markdown:

    <!-- table: accuracy.json | accuracy -->
    | method | keep 0.5 | keep 0.25 |        <- written by this script, never by hand
    ...
    <!-- /table -->

    python benchmarks/tables.py            # rewrite every table from its JSON (docs/results/*.md, docs/RESULTS.md)
    python benchmarks/tables.py --check    # exit 1 if any table differs from its JSON (the test does this)

tests/test_results_tables.py checks that every Markdown table in docs/results/ sits inside such
a block, that its JSON exists, and that the text equals what the renderer makes of the JSON.

Adding a table (e.g. docs/results/codec.md from codec.json): write the JSON with a committed
command (a benchmarks/ script or `mercury-onnx ... --json`, and a section in
benchmarks/reproduce.sh), put the two markers in the .md, then either
- use the generic `rows` renderer: the JSON holds {"columns": [...], "rows": [[...], ...]}
  (or a list of such tables under a key: `<!-- table: codec.json | rows | key=tables.0 -->`),
  cells printed as they are (format numbers in the script that writes the JSON), or
- add `def render_NAME(data: dict, **args) -> str` below and list it in RENDERERS.
Then run `python benchmarks/tables.py`. A JSON name with a `*`
(`<!-- table: codec_wire/band_*.json | codec_band -->`) hands the renderer {file stem: JSON}
of every match: one table from several raw files, none merged by hand.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- table: *(?P<json>[^|>]+?) *\| *(?P<spec>[^>]*?) *-->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _table(header: list[str], rows: list[list], align: list[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _pt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


# ---------------------------------------------------------------- renderers

def render_rows(data: dict, key: str | None = None) -> str:
    """{"columns": [...], "rows": [[...]]}, optionally found under a dotted key."""
    for part in (key.split(".") if key else []):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return _table(data["columns"], data["rows"], data.get("align"))


def render_accuracy(data: dict, methods: str | None = None) -> str:
    """`mercury-onnx eval --json`: one row per method, one column per keep ratio, top-1 in %
    with the difference to vanilla in brackets."""
    rows = data["results"]
    vanilla = next((r["top1"] for r in rows if r["method"] == "vanilla"), None)
    ratios = sorted({r["keep_ratio"] for r in rows if r["method"] != "vanilla"}, reverse=True)
    order = list(dict.fromkeys(r["method"] for r in rows))
    if methods:
        order = [m for m in methods.split(",") if m in order]
    out = []
    for m in order:
        cells = []
        for k in ratios:
            r = next((r for r in rows if r["method"] == m and (m == "vanilla" or r["keep_ratio"] == k)), None)
            if r is None:
                cells.append("-")
            elif m == "vanilla" or vanilla is None:
                cells.append(_pt(r["top1"]))
            else:
                cells.append(f"{_pt(r['top1'])} ({100 * (r['top1'] - vanilla):+.2f})")
        first = next(r for r in rows if r["method"] == m)
        out.append([m, first.get("pruning") or "-", first.get("reconstruction") or "-", *cells])
    header = ["method", "pruning", "reconstruction"] + [f"keep {k:g} ({100 * (1 - k):.0f}% pruned)" for k in ratios]
    return (_table(header, out, ["---", "---", "---"] + ["---:"] * len(ratios))
            + f"\n{data['dataset']}, {data['images']} images, top-1 %.\n")


def render_bench_speedup(data: dict) -> str:
    """`mercury-onnx bench --json`: Mercury's speed-up over mobile-only per trace (mean / median)."""
    traces = list(data["traces"])
    rows = []
    for name, s in data["mercury_vs_mobile"].items():
        rows.append([name] + [f"{s['per_trace'][t]['mean']:.2f} / {s['per_trace'][t]['p50']:.2f}" for t in traces]
                    + [f"{s['pooled_mean']:.2f} / {s['pooled_p50']:.2f}"])
    mob = {r["trace"]: r["latency_ms"]["mean"] for r in data["results"] if r["method"] == "mobile-only"}
    note = (f"\n{data['model']}, device {data['device']}, {next(iter(data['traces'].values()))['requests']} "
            f"requests per trace; mobile-only mean {next(iter(mob.values())):.0f} ms. "
            "Cells: speed-up by mean / by median latency.\n")
    return _table(["strategy"] + traces + ["all pooled"], rows) + note


def render_bench_planner(data: dict) -> str:
    """`mercury-onnx bench --json`: the adaptive planner against the best fixed strategy."""
    rows = []
    for t, p in data["planner"].items():
        rows.append([t, f"{p['planner']['mean_latency_ms']:.1f}", p["best_fixed"],
                     f"{p['best']['mean_latency_ms']:.1f}", "yes" if p["never_worse"] else "**no**",
                     "yes" if p["strictly_better"] else "no"])
    return _table(["trace", "planner mean ms", "best fixed", "its mean ms", "never worse", "strictly better"],
                  rows, ["---", "---:", "---", "---:", "---", "---"])


def render_bench_top1(data: dict) -> str:
    """`mercury-onnx bench --json`: top-1 per strategy (from the eval JSON or shipped calibration)."""
    seen, rows = set(), []
    for r in data["results"]:
        name = r["method"] + (f" r={r['keep_ratio']:g}" if r.get("keep_ratio") else "") + (
            f" {r['token_dtype']}" if r.get("token_dtype") else "")
        if name in seen or r.get("top1") is None:
            continue
        seen.add(name)
        rows.append([name, _pt(r["top1"]), r["payload_bytes"]])
    src = data.get("accuracy_source") or {}
    return (_table(["strategy", "top-1 %", "payload bytes"], rows)
            + f"\ntop-1 from {src.get('file', '-')}: {src.get('images', '-')} images of {src.get('dataset', '-')}.\n")


# ---------------------------------------------------------------- prune_point.md, runtime.md, codec.md

def render_prune_point_accuracy(data: dict, block: str = "accuracy.json") -> str:
    """`eval --json` of an `attn` checkpoint beside the `block` one (default: the shipped
    calibration's accuracy.json): top-1 per method and keep ratio, attn - block in brackets."""
    other = json.loads((RESULTS / block).read_text())
    top = lambda d: {(r["method"], r["keep_ratio"]): r["top1"] for r in d["results"]}  # noqa: E731
    a, b = top(data), top(other)
    keeps = sorted({k for m, k in a if k < 1}, reverse=True)
    rows = [["vanilla", *(_pt(b[("vanilla", 1.0)]) for _ in keeps), *(_pt(a[("vanilla", 1.0)]) for _ in keeps)]]
    for m in dict.fromkeys(m for m, k in a if m != "vanilla"):
        rows.append([m, *(_pt(b.get((m, k))) for k in keeps),
                     *(f"{_pt(a[(m, k)])} ({100 * (a[(m, k)] - b[(m, k)]):+.2f})" if (m, k) in b else _pt(a.get((m, k)))
                       for k in keeps)])
    header = ["method", *(f"block, keep {k:g}" for k in keeps), *(f"attn, keep {k:g} (attn - block)" for k in keeps)]
    return _table(header, rows) + (f"\n{data['dataset']}, {data['images']} images (block: {other['images']}), top-1 %; "
                                   "target: attn within 0.2 pt of block, or better.\n")


def render_prune_point_seeds(data: dict, block: str, attn0: str = "prune_point_accuracy_attn.json",
                             block0: str = "accuracy.json") -> str:
    """Mercury's top-1 at both prune points for two calibration seeds: `data` (attn) and `block`
    are seed 1's `eval --json`, attn0 / block0 seed 0's; attn - block per seed and their mean."""
    def top(name_or_data):
        d = name_or_data if isinstance(name_or_data, dict) else json.loads((RESULTS / name_or_data).read_text())
        return {r["keep_ratio"]: r["top1"] for r in d["results"] if r["method"] == "mercury"}

    seeds = [(0, top(block0), top(attn0)), (1, top(block), top(data))]
    keeps = sorted(seeds[1][2], reverse=True)
    rows, diffs = [], {k: [] for k in keeps}
    for seed, b, a in seeds:
        row = [str(seed)]
        for k in keeps:
            diffs[k].append(100 * (a[k] - b[k]))
            row += [_pt(b[k]), _pt(a[k]), f"{diffs[k][-1]:+.2f}"]
        rows.append(row)
    rows.append(["mean", *(c for k in keeps for c in ("", "", f"**{sum(diffs[k]) / len(diffs[k]):+.2f}**"))])
    header = ["seed", *(c for k in keeps for c in (f"block, keep {k:g}", f"attn, keep {k:g}", "attn - block"))]
    proxy = next(iter(data["calibration"]["per_keep_tokens"].values())).get("score_proxy") or {}
    return _table(header, rows) + (f"\n{data['dataset']}, {data['images']} images, Mercury top-1 %; attn's score "
                                   f"proxy: {proxy.get('kind', '-')}, width {proxy.get('rank', '-')}; target: attn "
                                   "within 0.2 pt of block, or better.\n")


def render_prune_point_latency(data: dict) -> str:
    """benchmarks/prune_point.py --json: paired head latency of the two prune points."""
    rows = []
    for r in data["rows"]:
        lo, hi = r["attn_vs_block_blocks"]
        target = (r["model"] in ("deit_base_patch16_224", "deit_small_patch16_224") and r["keep_ratio"] == 0.25
                  and data.get("head", "fp32") == "fp32" and not data.get("warm_runs"))   # read on cold fp32 rounds
        verdict = ("met" if r["attn_vs_block"] <= data["target_attn_vs_block"] else "**missed**") if target else "-"
        rows.append([f"{r['model']} ({r['img']} px)", f"{r['N']}→{r['K']}", r["rounds"], f"{r['block_ms']:.3f}",
                     f"{r['attn_ms']:.3f}", f"{r['attn_vs_block']:.3f} ({lo:.3f}–{hi:.3f})", verdict,
                     f"{r['flop_ratio']:.3f}", f"{r['block_gflops']:.4f} → {r['attn_gflops']:.4f}"])
    la, lb = data["loadavg_start"][0], data["loadavg_end"][0]
    return (_table(["model", "N→K", "rounds", "block head ms", "attn head ms", "attn / block (range over 4 blocks)",
                    f"≤ {data['target_attn_vs_block']:g} (DeiT-B/S, keep 0.25)", "FLOP ratio", "GFLOPs block → attn"],
                   rows, ["---", "---", "---:", "---:", "---:", "---:", "---", "---:", "---"])
            + f"\n{data.get('head', 'fp32')} heads; onnxruntime {data['onnxruntime']}, {data['threads']} thread, batch {data['batch']}, "
              f"{data['timer']}; "
              + (f"warm: each head {data['warm_runs']} times back to back per round, the last {data['warm_runs'] - 1} "
                 "timed; " if data.get("warm_runs") else "each head once per round (cold); ")
              + f"load average {la:.1f} at the start, {lb:.1f} at the end.\n")


def render_prune_point_profile(data: dict) -> str:
    """benchmarks/prune_point.py --profile --json: both heads' kernel time by part of the head."""
    parts = list(data["rows"][0]["profile_us"]["block"])[:-1]
    rows = []
    for r in data["rows"]:
        b, a = r["profile_us"]["block"], r["profile_us"]["attn"]
        mlp_rows = (r["K"] + r["P"]) / (r["N"] + r["P"])           # the attn MLP's rows / the block MLP's
        scaled = a["total"] - a["MLP"] + b["MLP"] * mlp_rows        # attn, its MLP at block's time per row
        ratios = [f"{a['total'] / b['total']:.3f}", f"{scaled / b['total']:.3f}", f"{r['flop_ratio']:.3f}"]
        for name, p in (("block", b), ("attn", a)):
            rows.append([f"{r['model']}, keep {r['keep_ratio']:g}" if name == "block" else "", f"`{name}`",
                         *(f"{p[k] / 1e3:.2f}" for k in parts), f"{p['total'] / 1e3:.2f}",
                         *(["", "", ""] if name == "block" else ratios)])
    return (_table(["model", "head", *(f"{k} ms" for k in parts), "total ms", "attn / block",
                    "attn / block, its MLP at block's time per row", "FLOP ratio"],
                   rows, ["---", "---"] + ["---:"] * (len(parts) + 4))
            + f"\nonnxruntime {data['onnxruntime']} profile, 1 thread, batch 1: medians of each kernel over 200 runs back "
              "to back (warm), summed by part of the head (benchmarks/prune_point.py kernel_parts; residual adds go "
              "with their branch).\n")


def render_score_proxy_overlap(data: dict) -> str:
    """benchmarks/score_proxy_overlap.py --json: each proxy's share of block's kept tokens."""
    labels = [k for k in data["rows"][0] if k not in ("keep_ratio", "K")]
    explained = {k: f" (explains {v['explained']:.3f})" for k, v in data["fits"].items()}
    rows = [[f"{label}{explained.get(label, '')}", *(f"{r[label]:.3f}" for r in data["rows"])] for label in labels]
    return (_table(["score proxy (kind, width)", *(f"keep {r['keep_ratio']:g} (K={r['K']})" for r in data["rows"])],
                   rows, ["---"] + ["---:"] * len(data["rows"]))
            + f"\n{data['model']}; fit on {data['fit_images']}, compared on {data['test_images']}.\n")


def render_ray_rounds(data: dict) -> str:
    """benchmarks/serve_load.py --engine ray --json: throughput per paired round, and the medians."""
    servers = ("standalone", "ray x1", "ray x2")
    rows = [[i + 1, *(f"{r[n]['req_s']:.2f}" for n in servers), f"{r['x2/x1']:.2f}x", f"{r['x1/standalone']:.2f}x",
             " / ".join(f"{r[n]['p99'] / r[n]['p50']:.2f}" for n in servers),
             " / ".join(f"{r[n]['mean_batch']:.1f}" for n in servers),
             " / ".join(f"{r[n]['ort_busy']:.2f}" for n in servers), " / ".join(str(r[n]["errors"]) for n in servers)]
            for i, r in enumerate(data["rounds"])]
    m = data["median"]
    rows.append(["median", "", "", "", f"{m['x2/x1']:.2f}x", f"{m['x1/standalone']:.2f}x",
                 " / ".join(f"{m[f'p99/p50 {n}']:.2f}" for n in servers), "", "", ""])
    la, lb = data["load_average_start"][0], data["load_average_end"][0]
    redo = sum(len(r.get("discarded", [])) for r in data["rounds"])
    left = sum(r[n]["cores"]["everything else"] > data["max_other_cores"] for r in data["rounds"] for n in servers)
    redo = (f"{redo} run(s) during which other jobs took > {data['max_other_cores']:g} cores measured again"
            + (f", {left} still disturbed after the last try" if left else "") + "; ") if redo or left else ""
    return (_table(["round", "standalone images/s", "ray x1 images/s", "ray x2 images/s", "x2 / x1 (≥ 1.6)",
                    "x1 / standalone (≥ 0.8)", "p99/p50 standalone / x1 / x2 (≤ 2)", "mean batch", "ORT busy",
                    "errors"], rows)
            + f"\n{data['timm_model']} tail ({data['model']}), {data['clients']} clients, {data['requests']} "
              f"single-image requests per run, max batch {data['max_batch']}, max delay {data['max_delay_ms']:g} ms, "
              f"1 ORT thread per server/replica, Ray max_ongoing_requests {data['max_ongoing']} per replica; "
              f"{redo}load average {la:.1f} at the start, {lb:.1f} at the end.\n")


def render_ray_cores(data: dict) -> str:
    """benchmarks/serve_load.py --engine ray --json: where the cores went (median over rounds)."""
    servers = ("standalone", "ray x1", "ray x2")
    groups = list(data["rounds"][0]["standalone"]["cores"])
    med = statistics.median
    rows = [[n, *(f"{med([r[n]['cores'][g] for r in data['rounds']]):.2f}" for g in groups),
             f"{med([r[n]['images_per_cpu_s'] for r in data['rounds']]):.1f}"] for n in servers]
    return _table(["server", *groups, "images per serving CPU-second"], rows)


def _band_cell(d: dict, payloads: str, codec: bool) -> str:
    """Mercury's band in a `bench --band` JSON, its payloads, and the modelled head time of its
    token (codec=False) or codec (codec=True) heads."""
    head = next(r["breakdown_ms"]["device_compute"] for r in d["results"]
                if r["method"] == "mercury" and r["token_dtype"].startswith("c") == codec)
    return f"{_band(d['band']['mercury']['band_mbps'], d['band']['rates_mbps'])} ({payloads}; head {head:.1f} ms)"


def render_prune_point_band(data: dict) -> str:
    """`bench --band --json band_<point>_<model>.json` (benchmarks/prune_point_band.sh): Mercury's
    band (best token variant per rate) at each prune point, keep 0.25, no codec."""
    rows = []
    for m in ("tiny", "small", "base"):
        cells = []
        for point in ("block", "attn"):
            d = data[f"band_{point}_deit_{m}"]
            small = min(_variants(d, 0.25, False), key=lambda s: s["payload_bytes"])
            cells.append(_band_cell(d, f"{small['token_dtype']} {small['payload_bytes']:,.0f} B", codec=False))
        rows.append([f"DeiT-{m[0].upper()} 224", *cells])
    return _table(["model", "`block`", "`attn`"], rows, ["---", "---", "---"])


def render_prune_point_codec_band(data: dict) -> str:
    """Mercury's band with its codec heads (best variant per rate, keep 0.25) at each prune point:
    codec_wire/band_codec_deit_<t|s|b>.json (`block`) and prune_point_band/band_attn_codec_deit_<name>.json."""
    rows = []
    for m in ("tiny", "small", "base"):
        cells = []
        for d in (data.get(f"band_codec_deit_{m[0]}"), data.get(f"band_attn_codec_deit_{m}")):
            if d is None:
                cells.append("not run")
                continue
            codecs = sorted(_variants(d, 0.25, True), key=lambda s: _codec_key(s["token_dtype"]))
            cells.append(_band_cell(d, ", ".join(f"{s['token_dtype'][1:]} {s['payload_bytes']:,.0f} B" for s in codecs),
                                    codec=True))
        rows.append([f"DeiT-{m[0].upper()} 224", *cells])
    return _table(["model", "`block` + codec", "`attn` + codec"], rows, ["---", "---", "---"])


def render_codec_inloop(data: dict, without: str = "codec/rate_curve.json") -> str:
    """`eval --rate-curve --json` of a checkpoint calibrated with the codec in the loop beside the
    same codec's rows from the checkpoint calibrated without it (same test images)."""
    other = json.loads((RESULTS / without).read_text())
    if (other["dataset"], other["images"]) != (data["dataset"], data["images"]):
        raise ValueError(f"{without}: other test images than the in-loop JSON")
    row = lambda d, k, c: next((r for r in d["results"] if r["method"] == "mercury"  # noqa: E731
                                and r["keep_ratio"] == k and r.get("codec") == c), None)
    rows = []
    for r in data["results"]:
        if r["method"] != "mercury" or not r.get("codec"):
            continue
        k, c = r["keep_ratio"], r["codec"]
        w, plain_w, plain_i = row(other, k, c), row(other, k, None), row(data, k, None)
        rows.append([f"{k:g}", c, f"{r['payload_bytes']:.0f}", _pt(w and w["top1"]), _pt(r["top1"]),
                     "-" if w is None else f"{100 * (r['top1'] - w['top1']):+.2f}",
                     _pt(plain_w and plain_w["top1"]), _pt(plain_i and plain_i["top1"])])
    return (_table(["keep", "codec", "bytes on the wire", "top-1 without", "top-1 with", "with - without",
                    "uncompressed, without", "uncompressed, with"], rows)
            + f"\n{data['dataset']}, {data['images']} images, top-1 %.\n")


def _codec_report():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import codec_report
    return codec_report


def render_codec(data: dict, part: str) -> str:
    """benchmarks/codec_report.py's tables: part = rate | criteria | photos | head | design."""
    cr = _codec_report()
    fn = {"rate": cr.rate_table, "criteria": cr.criteria, "photos": cr.photos_table, "head": cr.head_table,
          "design": cr.design_table}[part]
    return fn(data) + "\n"


# ---------------------------------------------------------------- codec_wire.md, formats.md
# codec_wire.md's tables read codec_wire/*.json through `*` names: {file stem: JSON}.

MODELS = {"ref": "reference 32×32", "deit_t": "DeiT-T 224", "deit_s": "DeiT-S 224", "deit_b": "DeiT-B 224"}
WEIGHTS = {"ref": "trained"}                      # the 224-px models have random weights here
SPEED_TARGET_MS = 1.0                             # issue 13, item 4: encode + decode, DeiT-B keep 0.25
BAND_TARGETS = {"deit_t": (0.1, 8.0), "deit_s": None, "deit_b": (0.05, 0.5)}   # issue 13, item 5; None: non-empty


def _by_model(data: dict, prefix: str) -> list[tuple[str, dict]]:
    """(model key, JSON) of the files PREFIX_<model>, in MODELS order."""
    return [(m, data[prefix + m]) for m in MODELS if prefix + m in data]


def _codec_key(codec: str) -> tuple[int, int]:
    d, b = codec.removeprefix("c").split("x")
    return int(d), int(b)


def _mbps(x: float, grid: list[float]) -> str:
    if x <= grid[0]:
        return f"≤ {grid[0]:g}"
    if x >= grid[-1]:
        return f"≥ {grid[-1]:g}"
    return f"{x:.3f}" if x < 0.1 else f"{x:#.3g}"


def _band(b: list[float] | None, grid: list[float]) -> str:
    return "empty" if b is None else f"[{_mbps(b[0], grid)}, {_mbps(b[1], grid)}]"


def render_codec_gap(data: dict) -> str:
    """`benchmarks/codec_wire.py --export DIR --json gap_<model>.json`: each codec's mean bytes on
    the wire (without / with its zstd dictionary) against the codes' order-0 entropy."""
    rows = []
    for m, d in _by_model(data, "gap_"):
        for r in sorted(d["rows"], key=lambda r: (-r["keep_ratio"], _codec_key(r["codec"]))):
            rows.append([f"{MODELS[m]} ({WEIGHTS.get(m, 'random')})", f"{r['keep_ratio']:g}", r["codec"],
                         f"{r['variance_kept']:.3f}", f"{r['raw_bits_bytes']:,} B", f"{r['bytes_plain']:,.1f} B",
                         f"{r['bytes_dict']:,.1f} B", f"{r['header_mask_bytes']} B", f"{r['entropy_bytes']:,.1f} B",
                         f"{r['gap_bytes_dict']:.1f} B", r["images"]])
    return _table(["model (weights)", "keep", "codec", "variance kept", "raw bit-packed codes", "zstd",
                   "zstd with dictionary", "of which header + mask", "entropy of the codes", "gap", "images"],
                  rows, ["---", "---:", "---"] + ["---:"] * 8)


def render_codec_speed(data: dict) -> str:
    """`benchmarks/codec_wire.py --json speed.json`: encode + decode p50 per codec, paired with the
    int8 token payload of the same image in every round."""
    rows = [[r["codec"], "yes" if r["dictionary"] else "no", f"{r['bytes']:,.0f}", f"{r['p50_ms']:.3f} ms",
             f"{r['p99_ms']:.1f} ms", f"{r['ratio_vs_int8_tokens']:.2f}×",
             "met" if r["p50_ms"] <= SPEED_TARGET_MS else "**missed**"] for r in data["rows"]]
    t = data["int8_tokens"]
    rows.append(["int8 tokens (today)", "–", f"{t['bytes']:,.0f}", f"{t['p50_ms']:.3f} ms", "–", "1", "–"])
    g = data["geometry"]
    return (_table(["codec", "dictionary", "bytes", "encode + decode p50", "p99",
                    "p50 vs int8 tokens (same run)", f"target p50 ≤ {SPEED_TARGET_MS:g} ms"],
                   rows, ["---", "---", "---:", "---:", "---:", "---:", "---"])
            + f"\nK = {g['K']} of N = {g['N']}, {g['tokens']} tokens; codes from {data['source']}; "
              f"1-min load average {data['load_1min']:.1f} at the end of the run.\n")


def _variants(bench: dict, keep: float, codec: bool) -> list[dict]:
    """Mercury's variants at one keep ratio in a `bench --band` JSON: its codec heads, or its tokens."""
    return [s for s in bench["band"]["strategies"].values() if s["method"] == "mercury"
            and s["keep_ratio"] == keep and s["token_dtype"].startswith("c") == codec]


def _band_target(m: str, b: list[float] | None, grid: list[float]) -> tuple[str, str]:
    """(target, result) for Mercury's band b against BAND_TARGETS[m]."""
    t = BAND_TARGETS[m]
    target = "non-empty" if t is None else f"⊇ [{t[0]:g}, {t[1]:g}]"
    if b is None:
        return target, "**missed**: empty"
    short = [] if t is None else (([f"bottom by {b[0] - t[0]:.2f}"] if b[0] > t[0] else [])
                                  + ([f"top by {t[1] - b[1]:.2f}"] if b[1] < t[1] else []))
    return target, (f"**missed** at the {' and '.join(short)} Mbps" if short else "met") + f": {_band(b, grid)}"


def render_codec_band(data: dict) -> str:
    """`bench --band --json band_{today,codec}_<model>.json`: the band of constant uplink rates
    where Mercury beats both mobile-only and cloud-only-jpeg; today with int8/fp16 tokens
    (band_today_<model>, or the codec export's own token variants where there is none), and per
    codec head. The target is checked on Mercury's band (best variant per rate) at keep 0.25."""
    rows = []
    for m, d in _by_model(data, "band_codec_"):
        grid, today = d["band"]["rates_mbps"], data.get("band_today_" + m, d)
        keeps = {s["keep_ratio"] for s in d["band"]["strategies"].values() if s["method"] == "mercury"}
        for keep in sorted(keeps, reverse=True):
            tok = sorted(_variants(today, keep, False), key=lambda s: s["payload_bytes"])
            best = next((s for s in tok if s["band_mbps"]), tok[0])        # int8 (smallest) when all are empty
            codecs = sorted(_variants(d, keep, True), key=lambda s: _codec_key(s["token_dtype"]))
            target, result = ("–", "–") if m not in BAND_TARGETS or keep != 0.25 else \
                _band_target(m, d["band"]["mercury"]["band_mbps"], grid)
            rows.append([MODELS[m], f"{keep:g}",
                         f"{_band(best['band_mbps'], grid)} ({best['token_dtype']}, {best['payload_bytes']:,.0f} B)",
                         "; ".join(f"{s['token_dtype'][1:]}: {_band(s['band_mbps'], grid)} ({s['payload_bytes']:,.0f} B)"
                                   for s in codecs), target, result])
    jpeg = ", ".join(f"{MODELS[m]} {d['band']['strategies']['cloud-only-jpeg']['payload_bytes']:,.0f} B"
                     for m, d in _by_model(data, "band_codec_"))
    return (_table(["model", "keep", "today: tokens (mean payload)", "codec: its band (mean payload)",
                    "target for Mercury's band", "result (Mercury's band: best variant per rate)"],
                   rows, ["---", "---:", "---", "---", "---", "---"])
            + f"\nBands in Mbps; RTT {next(iter(data.values()))['band']['rtt_ms']:.1f} ms; "
              f"cloud-only-jpeg mean payload: {jpeg}.\n")


def _codec_export_runs(data: dict) -> list[tuple[str, str, dict]]:
    """(model key, prune point, JSON) of codec-export bench runs: codec_wire/band_codec_<m>.json
    (`block`) and prune_point_band/band_attn_codec_deit_<name>.json (`attn`), in MODELS order."""
    attn = [(m, "attn", data[f"band_attn_codec_deit_{name}"])
            for m, name in (("deit_t", "tiny"), ("deit_s", "small"), ("deit_b", "base"))   # MODELS order
            if f"band_attn_codec_deit_{name}" in data]
    return [(m, "block", d) for m, d in _by_model(data, "band_codec_")] + attn


def render_codec_planner(data: dict) -> str:
    """`bench --json band_codec_<model>.json` (and the `attn` prune point's band_attn_codec_*):
    the planner, codec variants among its candidates, against the best fixed strategy per
    trace (mean latency)."""
    rows, runs, ok = [], {}, {}
    for m, point, d in _codec_export_runs(data):
        codecs = sorted({s["token_dtype"] for s in d["band"]["strategies"].values()
                         if s["method"] == "mercury" and s["token_dtype"].startswith("c")}, key=_codec_key)
        good = [t for t, p in d["planner"].items() if p["never_worse"]]
        misses = []
        for t, p in d["planner"].items():
            best, got = p["best"]["mean_latency_ms"], p["planner"]["mean_latency_ms"]
            if not p["never_worse"]:
                misses.append(f"{t}: {p['best_fixed']} {best:.2f} → {got:.2f} ms ({100 * (got / best - 1):+.1f}%)")
        if m != "ref":
            runs[point], ok[point] = runs.get(point, 0) + len(d["planner"]), ok.get(point, 0) + len(good)
        rows.append([f"{MODELS[m]}, {'/'.join(c[1:] for c in codecs)}" + (", `attn`" if point == "attn" else ""),
                     f"{len(good)} / {len(d['planner'])}", "met" if not misses else "**missed**", "; ".join(misses) or "–"])
    counts = "; ".join(f"{ok[p]} of {runs[p]} trace runs" + (f" at the `{p}` prune point" if len(runs) > 1 else "")
                       for p in runs)
    return (_table(["model, codecs", "traces never worse", "target: all", "misses (best fixed, its mean → planner mean)"],
                   rows, ["---", "---:", "---", "---"])
            + f"\n224-px codec exports: never worse on {counts}.\n")


def render_resize_rule(data: dict) -> str:
    """`benchmarks/resize_rule.py`: each resize rule against the device's, on real photos."""
    rows = [[name, f"{r['resize_ms_median']:.2f}", f"{r['input_mean_abs_diff']:.4f}",
             f"{100 * r['tokens_rel_l2_median']:.2f}% / {100 * r['tokens_rel_l2_max']:.2f}%",
             f"{100 * r['int8_range_per_tensor_change']:.2f}%",
             f"{100 * r['int8_range_per_channel_change_median']:.2f}% / {100 * r['int8_range_per_channel_change_max']:.2f}%"]
            for name, r in data["rules"].items()]
    note = (f"\n{data['photos']} photos of ../{data['folder']} at {data['size']}x{data['size']}; {data['model']}; "
            f"measured on {data['machine']} (resize times are noisy).")
    if data.get("cifar10_test_images_checked"):
        note += (f" At 32x32 (the reference model): {data['cifar10_test_not_32x32']} of the first "
                 f"{data['cifar10_test_images_checked']:,} CIFAR-10 test images are not 32x32, so no rule resizes them.")
    return _table(["rule", "resize ms / photo", "input mean abs diff", "block tokens rel. L2 (median / max)",
                   "int8 range change per tensor", "per channel (median / max)"], rows) + note + "\n"


RENDERERS = {"rows": render_rows, "accuracy": render_accuracy, "bench_speedup": render_bench_speedup,
             "bench_planner": render_bench_planner, "bench_top1": render_bench_top1,
             "prune_point_accuracy": render_prune_point_accuracy, "prune_point_latency": render_prune_point_latency,
             "prune_point_profile": render_prune_point_profile,
             "prune_point_seeds": render_prune_point_seeds,
             "prune_point_band": render_prune_point_band,
             "prune_point_codec_band": render_prune_point_codec_band, "ray_rounds": render_ray_rounds, "score_proxy_overlap": render_score_proxy_overlap, "ray_cores": render_ray_cores, "codec": render_codec, "codec_inloop": render_codec_inloop,
             "codec_gap": render_codec_gap, "codec_speed": render_codec_speed, "codec_band": render_codec_band,
             "codec_planner": render_codec_planner, "resize_rule": render_resize_rule}


# ---------------------------------------------------------------- the files

def render_block(json_name: str, spec: str) -> str:
    name, *args = spec.split()
    kwargs = dict(a.split("=", 1) for a in args)
    if name not in RENDERERS:
        raise KeyError(f"unknown renderer {name!r}; known: {', '.join(RENDERERS)}")
    return RENDERERS[name](load(json_name), **kwargs)


def load(json_name: str):
    """The JSON, or {file stem: JSON} of every file a name with `*` matches (relative to docs/results)."""
    if "*" not in json_name:
        return json.loads((RESULTS / json_name).read_text())
    files = sorted(RESULTS.glob(json_name))
    if not files:
        raise FileNotFoundError(f"no file in docs/results matches {json_name}")
    return {p.stem: json.loads(p.read_text()) for p in files}


def regenerate(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render_block(m["json"], m["spec"]) + m.group(5), text)


def documents() -> list[Path]:
    """Every file whose tables are generated: docs/results/*.md and docs/RESULTS.md."""
    return sorted(RESULTS.glob("*.md")) + [ROOT / "docs" / "RESULTS.md"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 when a table is stale")
    ap.add_argument("files", nargs="*", type=Path, help="default: docs/results/*.md")
    a = ap.parse_args()
    stale = []
    for md in a.files or documents():
        old = md.read_text()
        new = regenerate(old)
        if new != old:
            stale.append(md)
            if not a.check:
                md.write_text(new)
    verb = "stale" if a.check else "rewrote"
    for md in stale:
        print(f"{verb}: {md.resolve().relative_to(ROOT)}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
