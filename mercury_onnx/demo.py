"""mercury-onnx demo: the whole system end to end on loopback, in one command.

1. the meta-parameters: shipped with the package for the reference backbone (v3b recipe,
   models/reference.py); for any other model, `mercury-onnx calibrate` at a small budget (cached)
2. export head/tail/full ONNX (`mercury_onnx.export.export_model`; cached)
3. start `serve-tail` on a free 127.0.0.1 port in a subprocess
4. run the device-side client (head here, tail on the server) on N real test images,
   and full.onnx locally on the same images: top-1 of both, agreement, measured latencies
5. a short bench on one 5G trace (Pi profile, tail times measured on the running server),
   and the band of constant uplink rates where Mercury is the fastest strategy, for this
   export and for DeiT-B at 224 (Pi profile, modelled; runtime/band.py)

Everything it writes goes under the cache folder (default ~/.cache/mercury-onnx/demo), keyed
by the package version and source (cache_key.py) as well as the inputs.
It orchestrates every stage (calib, export, runtime), so it lives above them, not in runtime/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from .app import fail, need_export_extra

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_MODEL = SHARED / "models" / "deit_tiny_patch4_32_cifar10.json"
CIFAR = SHARED / "data" / "cifar10"


VANILLA = "vanilla (full.onnx, local)"
CODEC_IMAGES = 500          # train images the demo's codec is fit on (export --codec uses 2,000)


class DemoError(RuntimeError):
    """A demo step could not run; the message says which and why."""


@dataclass
class DemoOptions:
    model: str | None = None               # backbone JSON / timm name; default the reference model
    data: Path | None = None               # ImageFolder test split; default CIFAR-10 test
    train_data: Path | None = None         # calibration images; default DATA/../train
    images: int = 100                      # test images through the server
    keep_ratios: list = field(default_factory=lambda: [0.5, 0.25])
    token_dtype: str = "int8"
    codec: str | None = "16x4"             # also a token codec head/tail (export --codec); None: none
    calib_images: int = 500
    calib_steps: int = 10
    calibrate: bool = True
    trace: str = "5g-driving"
    requests: int = 500
    cache: Path = Path(os.environ.get("MERCURY_ONNX_CACHE", Path.home() / ".cache" / "mercury-onnx")) / "demo"


def _key(*parts) -> str:
    """Cache key: the package version and source content, then the inputs (cache_key.py)."""
    from .cache_key import cache_key
    return cache_key(*parts)


def pick_images(folder: Path, n: int, classes: list[str] | None) -> tuple[list[Path], list[int]]:
    """n images spread over the class folders (label = index in the model's class list), by
    the exporter's validation pick (`formats.images.pick`)."""
    from .formats.images import ImageError, list_images, pick

    try:
        paths, labels, found = list_images(folder)
    except ImageError as e:
        raise DemoError(str(e)) from e
    names = classes or found
    usable = [i for i, y in enumerate(labels) if found[y] in names]
    chosen = [usable[j] for j in pick([labels[i] for i in usable], n)]
    return [paths[i] for i in chosen], [names.index(found[labels[i]]) for i in chosen]


def _method_defaults() -> tuple:
    """The method's defaults go into the cache keys: a changed default is a new calibration."""
    from .models.config import MercuryConfig
    d = MercuryConfig()
    return d.score, d.reconstruction, d.region_size, d.prune_after_block


def calibrate(opts: DemoOptions, source: str, train: Path, echo) -> str:
    """Mercury checkpoint path (cached), the shipped reference calibration when the source is
    the reference backbone, or the source unchanged when calibration is skipped."""
    shipped = shipped_calibration(opts, source)
    if shipped:
        echo(f"[1/5] calibrate: shipped with the package ({shipped_summary()})")
        return shipped
    if not opts.calibrate:
        echo("[1/5] calibrate: skipped (--no-calibrate): uncalibrated meta-parameters")
        return source
    out = opts.cache / f"calib-{_key(Path(source), train, opts.keep_ratios, opts.calib_images, opts.calib_steps, *_method_defaults())}"
    if out.with_suffix(".json").exists():
        echo(f"[1/5] calibrate: cached {out}.json")
        return str(out.with_suffix(".json"))
    cmd = [sys.executable, "-m", "mercury_onnx.cli", "calibrate", source, str(train), "--out", str(out),
           "--images", str(opts.calib_images), "--steps", str(opts.calib_steps), "--heldout", "0"]
    for r in opts.keep_ratios:
        cmd += ["--keep-ratio", str(r)]
    echo(f"[1/5] calibrate: {opts.calib_images} images, {opts.calib_steps} steps -> {out}.json")
    help_rc = subprocess.run([sys.executable, "-m", "mercury_onnx.cli", "calibrate", "--help"],
                             capture_output=True).returncode
    if help_rc != 0:
        echo("      calibrate is not available in this build: SKIPPED (uncalibrated meta-parameters)")
        return source
    opts.cache.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd)
    if r.returncode != 0 or not out.with_suffix(".json").exists():
        raise DemoError(f"calibrate failed (exit {r.returncode}): {' '.join(cmd)}")
    return str(out.with_suffix(".json"))


def shipped_calibration(opts: DemoOptions, source: str) -> str | None:
    """`reference:SOURCE` for the reference backbone at the demo's default budget (the shipped
    calibration, v3b recipe), else None: other budgets and models calibrate here."""
    from .models.reference import is_reference_name, shipped_source

    defaults = DemoOptions()
    if not opts.calibrate or (opts.calib_images, opts.calib_steps) != (defaults.calib_images, defaults.calib_steps):
        return None
    s = shipped_source(source, opts.keep_ratios)
    return s if is_reference_name(s) else None


def shipped_summary() -> str:
    from .models.reference import info
    cal = info()["calibration"]
    temps = ", ".join(f"K={k} T={t:g}" for k, t in cal.get("temperature_per_keep_tokens", {}).items())
    return f"{cal['images']} train images, {cal['steps']} steps of {cal['batch_size']}, {temps}"


def committed_top1(source: str, keep_ratios: list) -> dict:
    """The committed 10,000-image test top-1 of the shipped calibration, by demo row name."""
    from .models.reference import info, is_reference_name
    if not is_reference_name(source):
        return {}
    acc = info().get("accuracy") or {"results": []}
    out = {}
    for r in acc["results"]:
        if r["method"] == "vanilla":
            out[VANILLA] = r["top1"]
        elif r["method"] == "mercury" and r["keep_ratio"] in keep_ratios:
            out[f"mercury r={r['keep_ratio']}"] = r["top1"]
    return out


def export(opts: DemoOptions, source: str, data: Path, train: Path, echo) -> Path:
    """head/tail/full (and the codec's head/tail, fit on CODEC_IMAGES train images), cached."""
    from .export import export_model
    codecs = [opts.codec] if opts.codec else []
    out = opts.cache / f"export-{_key(Path(source), opts.keep_ratios, opts.token_dtype, codecs, *_method_defaults())}"
    if (out / "manifest.json").exists():
        echo(f"[2/5] export: cached {out}")
        return out
    echo(f"[2/5] export -> {out}" + (f" (codec {opts.codec}, fit on {CODEC_IMAGES} images of {train})" if codecs else ""))
    export_model(source, out, opts.keep_ratios, token_dtypes=[opts.token_dtype] if opts.token_dtype != "fp32" else [],
                 validate_data=data, validate_images=32, codecs=codecs, calib_data=train if codecs else None,
                 codec_images=CODEC_IMAGES, log=lambda m: echo("      " + m))
    return out


def run_client(export_dir: Path, url: str, paths: list[Path], labels: list[int], opts: DemoOptions, echo) -> dict:
    """Every image through the server one at a time (the device's view), and through full.onnx."""
    from tqdm import tqdm

    from .formats.images import preprocess
    from .formats.manifest import load_manifest
    from .runtime.client import Client
    from .runtime.head import FullModel

    manifest = load_manifest(export_dir)
    full = FullModel(export_dir, manifest=manifest)
    out = {}
    wires = [(opts.token_dtype, None)] + ([("codec " + opts.codec, opts.codec)] if opts.codec else [])
    for r in opts.keep_ratios:
        for wire, codec in wires:
            client = Client(export_dir, url, keep_ratio=r, token_dtype=opts.token_dtype, fallback="none", codec=codec)
            split_pred, parts = [], []
            for p in tqdm(paths, desc=f"      client r={r} {wire}", leave=False):
                pred = client.predict([p])[0]
                split_pred.append(int(np.argmax(pred.logits)))
                parts.append(pred.breakdown)
            client.close()
            out[(r, wire)] = {"pred": split_pred, "ms": {k: float(np.nanmedian([b[k] for b in parts])) for k in parts[0]}}
    t = time.perf_counter()
    vanilla = [int(np.argmax(full(preprocess([p], manifest["preprocess"]))[0])) for p in paths]
    vanilla_ms = (time.perf_counter() - t) * 1e3 / len(paths)
    labels = np.array(labels)
    rows = {VANILLA: {"top1": float((np.array(vanilla) == labels).mean()), "agree": 1.0,
                                          "ms": {"full": vanilla_ms}}}
    for (r, wire), o in out.items():
        pred = np.array(o["pred"])
        rows[f"mercury r={r} {wire} (split)"] = {
            "top1": float((pred == labels).mean()), "agree": float((pred == np.array(vanilla)).mean()), "ms": o["ms"]}
    return rows


def run_demo(opts: DemoOptions, echo=print) -> dict:
    from .runtime.bench import BenchConfig, run_bench, sample_images
    from .runtime.band import format_band
    from .runtime.bench_report import format_table, plot
    from .runtime.bench_setup import resolve_cloud, setup_from_export, setup_from_name
    from .runtime.network import load_trace
    from .runtime.profiles import pi_profile, rtx4090_cloud
    from .runtime.server import spawn

    t0 = time.time()
    source = opts.model or (str(REF_MODEL) if REF_MODEL.exists() else None)
    if source is None:
        raise DemoError(f"no reference model at {REF_MODEL}: pass --model (a timm name or backbone JSON)")
    data = opts.data or (CIFAR / "test")
    if not data.exists():
        raise DemoError(f"no test images at {data}: pass --data DIR (ImageFolder: DIR/<class>/<image>)")
    train = opts.train_data or data.parent / "train"
    if opts.codec and not train.exists():
        raise DemoError(f"no train images at {train} to fit the codec on: pass --train-data DIR or --codec none")
    if opts.calibrate and not train.exists():
        raise DemoError(f"no calibration images at {train}: pass --train-data DIR or --no-calibrate")
    echo(f"mercury-onnx demo: model {source}\n  data {data}\n  cache {opts.cache}")
    opts.cache.mkdir(parents=True, exist_ok=True)

    ckpt = calibrate(opts, source, train, echo)
    export_dir = export(opts, ckpt, data, train, echo)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    paths, labels = pick_images(data, opts.images, manifest.get("classes"))

    echo("[3/5] serve-tail: starting on 127.0.0.1")
    log = open(opts.cache / "serve-tail.log", "w")
    try:
        proc, url = spawn(export_dir, "--threads", "1", log=log)
    except RuntimeError as e:
        raise DemoError(f"serve-tail did not start: {e} (log: {opts.cache / 'serve-tail.log'})") from e
    try:
        echo(f"      serving at {url} (pid {proc.pid}, log {opts.cache / 'serve-tail.log'})")
        echo(f"[4/5] client: {len(paths)} real images from {data}, one request each")
        rows = run_client(export_dir, url, paths, labels, opts, echo)
        echo(f"[5/5] bench: {opts.trace}, {opts.requests} requests, Raspberry Pi 4B profile (modelled), "
             "tails timed on the running server, top-1 from step 4 (janus-like: none)")
        setup = setup_from_export(export_dir)
        cloud = resolve_cloud("local", url, setup, lambda m: echo("      " + m))
        evals = [{"method": "vanilla", "keep_ratio": 1.0, "top1": rows[VANILLA]["top1"]}]
        evals += [{"method": "mercury", "keep_ratio": r, "token_dtype": opts.token_dtype,
                   "top1": rows[f"mercury r={r} {opts.token_dtype} (split)"]["top1"]} for r in opts.keep_ratios]
        if opts.codec:
            evals += [{"method": "mercury", "keep_ratio": r, "codec": opts.codec,
                       "top1": rows[f"mercury r={r} codec {opts.codec} (split)"]["top1"]} for r in opts.keep_ratios]
        report, curves = run_bench(setup, pi_profile(), cloud, sample_images(data, 32),
                                   BenchConfig([load_trace(opts.trace)], requests=opts.requests), evals)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    # where the split pays: the band of constant uplink rates, with the modelled RTX 4090 cloud like
    # docs/results/codec_wire.md (the tails above are loopback HTTP round trips, full.onnx is not)
    band, _ = run_bench(setup, pi_profile(), rtx4090_cloud(), sample_images(data, 32),
                        BenchConfig([load_trace(opts.trace)], requests=50, band=True), evals)
    report["band"] = band["band"]
    photos = SHARED / "data" / "imagenet-sample"
    deit_b = None
    if photos.exists():   # and for a big model: DeiT-B, no export needed (modelled)
        deit_b, _ = run_bench(setup_from_name("deit_base_patch16_224", opts.keep_ratios), pi_profile(),
                              rtx4090_cloud(), sample_images(photos, 32),
                              BenchConfig([load_trace(opts.trace)], requests=50, band=True), [])
    res_dir = opts.cache / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "bench.json").write_text(json.dumps(report, indent=1))
    if deit_b is not None:
        (res_dir / "band_deit_b.json").write_text(json.dumps(deit_b["band"], indent=1))
    (res_dir / "client.json").write_text(json.dumps(rows, indent=1))
    plots = plot(report, curves, res_dir)

    committed = committed_top1(ckpt, opts.keep_ratios)
    echo("\n== accuracy and measured latency on loopback (this machine) ==")
    echo(f"{'':38} {'top-1':>7} {'10k':>7} {'agree':>7}   median ms per image")
    for name, r in rows.items():
        ms = ", ".join(f"{k} {v:.2f}" if k != "payload_bytes" else f"{int(v)} B" for k, v in r["ms"].items())
        # the committed figure is the uncompressed tokens' (the codec rows' 10k are in docs/results/codec.md)
        c = committed.get(name.removesuffix(f" {opts.token_dtype} (split)"))
        r["top1_committed_10k"] = c
        echo(f"{name:38} {r['top1']:7.3f} {'' if c is None else format(c, '.4f'):>7} {r['agree']:7.3f}   {ms}")
    echo(f"({len(paths)} images; '10k' = committed top-1 on all 10,000 test images with the same "
         "calibration (docs/results/accuracy.json); 'agree' = same top-1 class as vanilla; head/encode on "
         "this machine, round_trip = HTTP to serve-tail incl. its tail run)")
    echo("\n== short bench ==")
    echo(format_table(report))
    echo("\n== where the split pays: the band of uplink rates (Pi profile, modelled) ==")
    echo(format_band(report["band"], report["model"], report["device"]))
    if deit_b is not None:
        echo(format_band(deit_b["band"], deit_b["model"], deit_b["device"]))
        echo("(DeiT-B without an export: int8/fp16 tokens only; with codec heads see docs/results/codec_wire.md)")
    echo(f"\nresults: {res_dir}/bench.json, {res_dir}/client.json")
    echo("plots: " + (", ".join(map(str, plots)) if plots else "skipped (matplotlib not installed)"))
    echo(f"demo done in {time.time() - t0:.0f} s")
    return {"client": rows, "bench": report, "plots": [str(p) for p in plots], "export": str(export_dir)}


def demo(
    model: Optional[str] = typer.Option(None, help="timm name or backbone JSON (default: the reference "
                                                     "checkpoint in ../shared/models)"),
    data: Optional[Path] = typer.Option(None, help="test images DIR/<class>/<image> (default CIFAR-10 test)"),
    train_data: Optional[Path] = typer.Option(None, help="calibration images (default DATA/../train)"),
    images: int = typer.Option(100, help="test images sent through the server"),
    keep_ratio: List[float] = typer.Option([0.5, 0.25], "--keep-ratio", "-r"),
    token_dtype: str = typer.Option("int8", help="int8 | fp16 tokens on the wire"),
    codec: str = typer.Option("16x4", help="also send a token codec's codes (export --codec DxB); 'none': no codec"),
    calib_images: int = typer.Option(500), calib_steps: int = typer.Option(10),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate"),
    trace: str = typer.Option("5g-driving", help="trace for the short bench"),
    requests: int = typer.Option(500, help="requests in the short bench"),
    cache: Optional[Path] = typer.Option(None, help="default ~/.cache/mercury-onnx/demo"),
) -> None:
    """The whole system end to end on loopback: calibrate, export, serve-tail, client on real
    images (accuracy vs vanilla, measured latency), and a short bench on a 5G trace."""
    need_export_extra("demo")
    if images < 1 or requests < 1:
        fail("--images and --requests must be >= 1")
    if token_dtype not in ("int8", "fp16"):
        fail("--token-dtype: int8 or fp16")
    from .formats.codec_wire import codec_name
    codec = None if codec.lower() in ("", "none") else codec
    if codec:
        try:
            codec = codec_name(codec)
        except ValueError as e:
            fail(f"--codec: {e}")
    opts = DemoOptions(model=model, data=data, train_data=train_data, images=images, codec=codec,
                       keep_ratios=list(keep_ratio), token_dtype=token_dtype, calib_images=calib_images,
                       calib_steps=calib_steps, calibrate=calibrate, trace=trace, requests=requests)
    if cache is not None:
        opts.cache = cache
    try:
        run_demo(opts, typer.echo)
    except DemoError as e:
        fail(str(e))
