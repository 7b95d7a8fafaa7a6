"""bench: end-to-end latency, payload and device energy of split strategies over real traces.

Strategies: mobile-only, cloud-only-jpeg (real images as JPEG q90 at the model's input size),
cloud-only-hq (JPEG q90 at hq_size), mercury (each keep ratio, fp16 and int8 tokens, the
codec's exact payload bytes; and each codec the export has, with the real encoded bytes of
every image through the codec head, formats/codec_wire.py), janus-like (progressive pruning over 3 device blocks, modelled),
and mercury-adaptive (planner.Planner, per request). The model and profiles come from
bench_setup, the request simulation from bench_sim; this module builds the strategies, runs
them over each trace and writes the report.

numpy + onnxruntime (+ pillow for the JPEG sizes, matplotlib optional for plots); no torch.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats.images import list_images
from . import vit_flops as VF
from .bench_setup import JANUS_BLOCKS, BenchError, ModelSetup, graph_flops
from .bench_sim import Outcome, Strategy, make_requests, run_fixed, run_planner
from .network import Trace
from .planner import proxy_accuracy
from .profiles import CloudProfile, DeviceProfile

METHODS = ("mobile-only", "cloud-only-jpeg", "cloud-only-hq", "mercury", "janus-like", "mercury-adaptive")
JPEG_QUALITY = 90


# ----------------------------------------------------------------------------- payloads
def mercury_payload_bytes(k: int, dim: int, num_patches: int, token_dtype: str, prefix: int = 1) -> int:
    """Bytes of one image's token payload (P = prefix tokens), from the runtime codec's real encoding."""
    try:
        from . import codec
    except ImportError:   # the same layout as docs/FORMAT.md "Token payload", computed
        item = {"fp16": 2, "int8": 1, "fp32": 4}[token_dtype]
        return (40 + (prefix + k) * dim * item + (4 * (prefix + k) if token_dtype == "int8" else 0)
                + k * (2 if num_patches < 32768 else 4))
    tokens = np.zeros((1, prefix + k, dim), np.float32)
    idx = np.arange(k, dtype=np.int64)[None]
    return len(codec.encode(tokens, idx, model_id="0" * 16, keep_ratio=k / num_patches,
                            num_patches=num_patches, token_dtype=token_dtype))


def codec_payloads(s: ModelSetup, k: int, entry: dict, images: list[Path]) -> np.ndarray:
    """Bytes on the wire of each image through the export's codec head and codec_wire.encode
    (header, mask and zstd body with the codec's dictionary): real sizes, not a formula."""
    from ..formats import codec_wire
    from ..formats.images import preprocess
    from .head import Head

    head = Head(s.export_dir, k / s.geom.num_patches, manifest=s.manifest, codec=entry["name"], threads=1)
    dic = codec_wire.load_dictionary(s.export_dir, entry)
    sizes = []
    for i in range(0, len(images), 16):
        out = head(preprocess(images[i:i + 16], s.manifest["preprocess"]))
        for j in range(len(out["codes"])):
            sizes.append(len(codec_wire.encode(out["codes"][j:j + 1], out["indices"][j:j + 1], s.geom.num_patches,
                                               entry["bits"], s.model_id, entry["codec_id"], dic)))
    return np.array(sizes, dtype=np.float64)


def default_images(input_size: tuple[int, int], data_dir: Path) -> Path:
    """Real images for the JPEG and codec sizes (data_dir = ../shared/data): CIFAR-10 test for
    small inputs, the real photos of imagenet-sample (center-cropped to the input) for 224-px models."""
    return Path(data_dir) / ("imagenet-sample" if min(input_size) >= 128 else "cifar10/test")


def sample_images(folder: str | Path, count: int, skip: int = 0) -> list[Path]:
    """`count` images of an image folder spread evenly over its sorted files (every class),
    after the first `skip` (e.g. the photos a codec was fit on)."""
    paths = sorted(list_images(folder)[0])[skip:]
    return paths[::max(1, len(paths) // count)][:count]


def jpeg_sizes(files: list[Path], size: tuple[int, int], quality: int = JPEG_QUALITY) -> tuple[np.ndarray, float]:
    """(bytes per image, median over images of the min-of-3 encode ms on this machine) of JPEG
    q`quality` at `size` (W, H): the real images resized (shorter side) and center-cropped,
    as the model's preprocessing does, so a photo is not squashed."""
    from PIL import Image

    from ..formats.images import resize_crop
    sizes, times = [], []
    Image.new("RGB", size).save(io.BytesIO(), "JPEG", quality=quality)   # warm up the encoder
    for f in files:
        img = resize_crop(Image.open(f).convert("RGB"), size[1], size[0])
        best = float("inf")
        for _ in range(3):                      # min of 3: a shared CPU adds noise, never speed
            buf = io.BytesIO()
            t = time.perf_counter()
            img.save(buf, "JPEG", quality=quality)
            best = min(best, (time.perf_counter() - t) * 1e3)
        times.append(best)
        sizes.append(buf.tell())
    return np.array(sizes, dtype=np.float64), float(np.median(times))


# ----------------------------------------------------------------------------- accuracy
def eval_source(path: str | Path) -> dict:
    """Where the accuracy column comes from: the eval JSON's file, dataset and image count."""
    d = json.loads(Path(path).read_text())
    return {"file": str(path), "dataset": d.get("dataset"), "images": d.get("images")}


def load_eval(path: str | Path | None) -> list[dict]:
    if path is None:
        return []
    try:
        d = json.loads(Path(path).read_text())
        return list(d["results"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"cannot read eval JSON {path}: {e} (expected {{'results': [{{'method', "
                         "'pruning', 'reconstruction', 'keep_ratio', 'top1'}}]}})") from e


def lookup_top1(evals: list[dict], method: str, keep_ratio: float | None, token_dtype: str | None,
                reconstruction: str | None = None, codec: str | None = None) -> float | None:
    """Top-1 of a strategy from the eval JSON's rows, or None when it has no matching row.
    With `codec` ('16x4'), only rows of that codec (eval --codec / --rate-curve rows)."""
    if codec is not None:
        rows = [r for r in evals if r.get("codec") == codec and r.get("method") == "mercury"
                and r.get("keep_ratio") is not None and keep_ratio is not None
                and abs(r["keep_ratio"] - keep_ratio) < 2e-3]
        return float(rows[0]["top1"]) if rows else None
    def close(r):
        return r.get("keep_ratio") is not None and keep_ratio is not None and abs(r["keep_ratio"] - keep_ratio) < 2e-3

    if method in ("mobile-only", "cloud-only-jpeg", "cloud-only-hq"):
        rows = [r for r in evals if r.get("method") in ("vanilla", "full", "mobile-only")
                or (r.get("pruning") in (None, "none") and r.get("keep_ratio") in (None, 1.0))]
    elif method == "janus-like":
        rows = [r for r in evals if close(r) and ("janus" in str(r.get("method", "")) or r.get("pruning") == "janus")]
    else:   # the export's reconstruction when the eval has it (e.g. regional+meta-local), else "mercury"
        rows = [r for r in evals if close(r) and (r.get("method") == "mercury" or (
                r.get("pruning") == "regional" and str(r.get("reconstruction", "")).startswith("meta")
                and "+" in str(r.get("method", ""))))]
        if reconstruction and any(r.get("reconstruction") == reconstruction for r in rows):
            rows = [r for r in rows if r.get("reconstruction") == reconstruction]
        rows = sorted(rows, key=lambda r: r.get("method") != "mercury")
    if token_dtype and any(r.get("token_dtype") == token_dtype for r in rows):
        rows = [r for r in rows if r.get("token_dtype") == token_dtype]
    return float(rows[0]["top1"]) if rows else None


def build_strategies(s: ModelSetup, device: DeviceProfile, cloud: CloudProfile, images: list[Path],
                     hq_size: int, evals: list[dict], token_dtypes=("fp16", "int8")) -> list[Strategy]:
    flops = graph_flops(s)
    full_file = s.manifest["full"]["file"] if s.manifest else None
    recon = s.manifest.get("reconstruction") if s.manifest else None
    out = []

    def dev(fl, graph=None):
        return device.compute_ms(fl, graph, s.model_id)

    def cld(fl, graph=None):
        return cloud.compute_ms(fl, graph)

    ms, meas = dev(flops["full"], full_file)
    out.append(Strategy("mobile-only", None, None, ms, np.zeros(1), 0.0,
                        lookup_top1(evals, "mobile-only", None, None), ["device_compute"] if meas else []))
    h, w = s.input_size
    cloud_full, cmeas = cld(flops["full"], full_file)
    for method, size in (("cloud-only-jpeg", (w, h)), ("cloud-only-hq", (hq_size, hq_size))):
        sizes, enc_ms = jpeg_sizes(images, size)
        out.append(Strategy(method, None, None, enc_ms, sizes, cloud_full,
                            lookup_top1(evals, method, None, None),
                            ["device_compute (JPEG encode, this machine)", "payload_bytes"]
                            + (["cloud_compute"] if cmeas else []),
                            notes=f"JPEG q{JPEG_QUALITY} {size[0]}x{size[1]} of {len(images)} real images, "
                                  f"mean {sizes.mean():.0f} B; top-1 of the uncompressed model"))
    for k, r in zip(s.keep_tokens, s.keep_ratios):
        files = s.files(k)
        cloud_ms, cm = cld(flops[("tail", k)], files.get("tail"))
        for dt in token_dtypes:
            head_file = files.get("head_tok8") if dt == "int8" and files.get("head_tok8") else files.get("head")
            ms, meas = dev(flops[("head", k)], head_file)
            nbytes = mercury_payload_bytes(k, s.geom.dim, s.geom.num_patches, dt, s.geom.num_prefix_tokens)
            out.append(Strategy("mercury", round(r, 6), dt, ms, np.array([float(nbytes)]), cloud_ms,
                                lookup_top1(evals, "mercury", r, dt, recon),
                                (["device_compute"] if meas else []) + ["payload_bytes"]
                                + (["cloud_compute"] if cm else [])))
        for c in s.codecs(k):
            head_file, tail_file = c["head"]["file"], c["tail"]["file"]
            proj = 2 * (s.geom.num_prefix_tokens + k) * s.geom.dim * c["dims"]                 # the projection (and back), counted
            ms, meas = dev(flops[("head", k)] + proj, head_file)
            cms, cm = cld(flops[("tail", k)] + proj, tail_file)
            sizes = codec_payloads(s, k, c, images)
            out.append(Strategy("mercury", round(r, 6), f"c{c['name']}", ms, sizes, cms,
                                lookup_top1(evals, "mercury", r, None, recon, codec=c["name"]),
                                (["device_compute"] if meas else []) + ["payload_bytes"]
                                + (["cloud_compute"] if cm else []),
                                notes=f"codec {c['name']} ({c['codec_id']}): real payloads of {len(images)} images "
                                      f"through {head_file}, mean {sizes.mean():.0f} B"))
        jh, jt = flops[("janus_head", k)], flops[("janus_tail", k)]
        for dt in token_dtypes:
            nbytes = mercury_payload_bytes(k, s.geom.dim, s.geom.num_patches, dt, s.geom.num_prefix_tokens)
            out.append(Strategy("janus-like", round(r, 6), dt, dev(jh)[0], np.array([float(nbytes)]), cld(jt)[0],
                                lookup_top1(evals, "janus-like", r, dt), ["payload_bytes"],
                                notes=f"{JANUS_BLOCKS} device blocks, tokens "
                                      f"{VF.janus_schedule(s.geom.num_patches, k, JANUS_BLOCKS)}"))
    return out


# ----------------------------------------------------------------------------- report rows
def summarize(trace: str, method: str, keep_ratio, token_dtype, o: Outcome, top1, measured) -> dict:
    lat = o.latency_ms.ravel()
    return {"trace": trace, "method": method, "keep_ratio": keep_ratio, "token_dtype": token_dtype,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                           "mean": float(lat.mean())},
            "breakdown_ms": {"device_compute": float(o.device_ms.mean()), "transmission": float(o.tx_ms.mean()),
                             "rtt": float(o.rtt_ms.mean()), "cloud_compute": float(o.cloud_ms.mean())},
            "payload_bytes": int(round(float(o.payload.mean()))),
            "energy_mj": float(o.energy_mj.mean()),
            "top1": top1, "measured": list(measured)}


def best_at_accuracy(fixed: dict[str, dict], accuracy: float) -> tuple[str, dict]:
    """The lowest SLO-violation rate reachable at mean accuracy >= `accuracy` by a fixed
    strategy, or by a random mix of two (a request goes to one or the other: accuracy,
    violation rate and mean latency mix linearly; three or more never do better than two).
    So a planner at 0.5861 is compared with the right blend of a 0.586 and a 0.590 strategy,
    not only with the 0.590 one. Returns (label, its stats)."""
    best: tuple[str, dict] | None = None

    def keep(label, stats):
        nonlocal best
        key = (stats["slo_violation_rate"], stats["mean_latency_ms"])
        if best is None or key < (best[1]["slo_violation_rate"], best[1]["mean_latency_ms"]):
            best = (label, stats)

    for k, f in fixed.items():
        if f["mean_accuracy"] >= accuracy - 1e-12:
            keep(k, f)
    for lo, flo in fixed.items():
        for hi, fhi in fixed.items():
            if not flo["mean_accuracy"] < accuracy - 1e-12 < fhi["mean_accuracy"]:
                continue
            w = (fhi["mean_accuracy"] - accuracy) / (fhi["mean_accuracy"] - flo["mean_accuracy"])   # share of lo
            keep(f"{100 * w:.1f}% {lo} + {100 * (1 - w):.1f}% {hi}",
                 {key: w * flo[key] + (1 - w) * fhi[key] for key in ("mean_latency_ms", "mean_accuracy",
                                                                      "slo_violation_rate")})
    if best is None:   # nothing reaches that accuracy: the most accurate
        k = max(fixed, key=lambda k: fixed[k]["mean_accuracy"])
        best = (k, fixed[k])
    return best


def fixed_vs_planner(outcomes: dict[str, Outcome], planner: Outcome, accuracy: dict[str, float],
                     planner_acc: float, slo_ms: float | None) -> dict:
    """The planner against every fixed strategy on one trace: SLO-violation rate, mean
    latency, mean accuracy; and whether it is never worse than the best fixed strategy
    (no SLO: by mean latency; with one: by violation rate at equal accuracy, see
    best_at_accuracy)."""
    def stats(o, acc):
        lat = o.latency_ms
        return {"mean_latency_ms": float(lat.mean()), "mean_accuracy": acc,
                "slo_violation_rate": None if slo_ms is None else float((lat > slo_ms).mean())}

    fixed = {k: stats(o, accuracy[k]) for k, o in outcomes.items()}
    mine = stats(planner, planner_acc)
    if slo_ms is None:
        best = min(fixed, key=lambda k: fixed[k]["mean_latency_ms"])
        best_stats = fixed[best]
        ok = mine["mean_latency_ms"] <= best_stats["mean_latency_ms"] * (1 + 1e-9)
        strict = mine["mean_latency_ms"] < best_stats["mean_latency_ms"] * (1 - 1e-3)
        basis = "mean latency (no SLO)"
    else:
        best, best_stats = best_at_accuracy(fixed, planner_acc)
        ok = mine["slo_violation_rate"] <= best_stats["slo_violation_rate"] + 1e-12
        strict = mine["slo_violation_rate"] < best_stats["slo_violation_rate"] - 1e-12
        basis = "SLO-violation rate at the planner's accuracy (a fixed strategy or a mix of two)"
    return {"planner": mine, "fixed": fixed, "best_fixed": best, "best": best_stats, "basis": basis,
            "never_worse": bool(ok), "strictly_better": bool(strict)}


def speedup_vs_mobile(strategies: list[Strategy], curves: dict) -> dict:
    """Speed-up of each Mercury variant over mobile-only: per trace by mean and by median
    latency, and over all traces' requests pooled (mean and median), plus the geometric mean
    of the per-trace mean ratios."""
    out = {}
    for st in strategies:
        if st.method != "mercury" or not curves:
            continue
        per, ratios = {}, []
        for trace, c in curves.items():
            mob, me = c["mobile-only"], c[st.label]
            per[trace] = {"mean": float(mob.mean() / me.mean()), "p50": float(np.median(mob) / np.median(me))}
            ratios.append(per[trace]["mean"])
        mob = np.concatenate([c["mobile-only"].ravel() for c in curves.values()])
        me = np.concatenate([c[st.label].ravel() for c in curves.values()])
        out[st.label] = {"per_trace": per, "pooled_mean": float(mob.mean() / me.mean()),
                         "pooled_p50": float(np.median(mob) / np.median(me)),
                         "geomean_of_trace_means": float(np.exp(np.mean(np.log(ratios))))}
    return out


# ----------------------------------------------------------------------------- the run
@dataclass
class BenchConfig:
    traces: list[Trace]
    requests: int = 2000
    slo_ms: float | None = None
    hq_size: int = 1024
    interval_ms: float = 500.0
    seed: int = 0
    # transfers the planner estimates the link from. Janus uses 10; 10 misses how often a bursty
    # link stalls, and with codec payloads of ~200 B the planner then offloaded into
    # mahimahi ATT's outages and lost to mobile-only (43.6 vs 42.8 ms); 30 is never worse on
    # all 9 traces (reference model with and without codec, DeiT-T/S/B modelled)
    window: int = 30
    band: bool = False             # also the constant-rate band where Mercury is fastest (runtime/band.py)


def run_bench(setup: ModelSetup, device: DeviceProfile, cloud: CloudProfile, images: list[Path],
              cfg: BenchConfig, evals: list[dict], progress=None) -> tuple[dict, dict]:
    """The bench report (the JSON) and, per trace, every strategy's latencies (for plots)."""
    strategies = build_strategies(setup, device, cloud, images, cfg.hq_size, evals)
    results, planner_report, traces_info, curves = [], {}, {}, {}
    band = None
    if cfg.band:
        from .band import compute_band
        rtt = float(np.concatenate([t.rtt_ms for t in cfg.traces]).mean())
        band = compute_band([st for st in strategies if st.method in ("mobile-only", "cloud-only-jpeg", "mercury")],
                            rtt)
        band["rtt_source"] = "mean of the RTT samples of " + ", ".join(t.name for t in cfg.traces)
    acc_known = all(st.top1 is not None for st in strategies if st.method in ("mobile-only", "mercury"))
    for trace in cfg.traces:
        rng = np.random.default_rng(cfg.seed)
        req = make_requests(trace, cfg.requests, rng, cfg.interval_ms)
        outcomes = [run_fixed(st, trace, req, device) for st in strategies]
        for st, o in zip(strategies, outcomes):
            results.append(summarize(trace.name, st.method, st.keep_ratio, st.token_dtype, o, st.top1, st.measured))
        pout, choice = run_planner(strategies, outcomes, trace, req, device, cfg.slo_ms, cfg.window)
        pacc = float(np.nanmean(pout.accuracy)) if acc_known else None
        results.append(summarize(trace.name, "mercury-adaptive", None, None, pout, pacc,
                                 sorted(set.intersection(*[set(strategies[i].measured) for i in np.unique(choice)]))))
        # accuracy used for the comparison: top-1 when known, else the planner's proxy
        acc = {st.label: (st.top1 if st.top1 is not None else proxy_accuracy(st.method, st.keep_ratio, st.token_dtype))
               for st in strategies}
        planner_acc = float(np.mean([acc[strategies[i].label] for i in choice.ravel()]))
        rep = fixed_vs_planner({st.label: o for st, o in zip(strategies, outcomes)
                                if st.method in ("mobile-only", "cloud-only-jpeg", "mercury")},
                               pout, acc, planner_acc, cfg.slo_ms)
        labels, counts = np.unique([strategies[i].label for i in choice.ravel()], return_counts=True)
        rep["choices"] = {str(l): float(c / choice.size) for l, c in zip(labels, counts)}
        rep["fallback_rate"] = pout.fallback_rate
        rep["race_rate"] = pout.race_rate
        rep["ahead_sent_rate"] = pout.ahead_sent_rate
        rep["ahead_rate"] = pout.ahead_rate
        rep["accuracy_basis"] = "top1 from the eval JSON" if acc_known else "proxy (no eval JSON): keep ratio"
        planner_report[trace.name] = rep
        traces_info[trace.name] = {"source": trace.source, "rtt_source": trace.rtt_source,
                                   "duration_s": trace.duration_s, "mean_mbps": trace.mean_mbps,
                                   "requests": int(req.start_s.size)}
        curves[trace.name] = {**{st.label: o.latency_ms for st, o in zip(strategies, outcomes)},
                              "mercury-adaptive": pout.latency_ms}
        if progress:
            progress(trace.name)
    return {"mercury_vs_mobile": speedup_vs_mobile(strategies, curves), "device": device.name, "results": results,
            "model": setup.label, "model_id": setup.model_id,
            "device_profile": device.to_json(), "cloud": {"name": cloud.name, "source": cloud.source},
            "slo_ms": cfg.slo_ms, "traces": traces_info, "planner": planner_report, "band": band,
            "strategies": {st.label: {"notes": st.notes, "measured": st.measured} for st in strategies},
            "assumptions": ["requests are independent (no queueing on device or link)",
                            "transmission = real trace bandwidth integrated from when the device is done",
                            "RTT sampled iid from the trace's ping file; device energy is modelled"]}, curves
