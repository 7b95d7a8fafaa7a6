"""CLI commands of this area: bench, profile.

Defined here, registered on the app by mercury_onnx/cli.py. Keep module-level imports light
(no torch/timm/onnx): import inside each command.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..app import fail, shown_path


def bench(
    export_dir: Optional[Path] = typer.Argument(None, help="export folder (or use --model)"),
    model: Optional[str] = typer.Option(None, help="timm name, no export: every compute figure modelled"),
    keep_ratio: List[float] = typer.Option([0.5, 0.25], "--keep-ratio", "-r", help="with --model"),
    img_size: Optional[int] = typer.Option(None, help="with --model"),
    patch_size: Optional[int] = typer.Option(None, help="with --model"),
    num_classes: int = typer.Option(1000, help="with --model"),
    prune_point: str = typer.Option("block", help="with --model: block or attn (an export says its own)"),
    device: str = typer.Option("pi", help="pi | host | profile JSON from `mercury-onnx profile`"),
    cloud: str = typer.Option("rtx4090", help="rtx4090 (paper's 0.86 ms DeiT-B, modelled) | local (measured here)"),
    server: Optional[str] = typer.Option(None, help="serve-tail URL: time the tails on it"),
    trace: List[str] = typer.Option(["5g-driving", "lte-driving"], "--trace", "-t"),
    traces_dir: Optional[Path] = typer.Option(None, help="default ../shared/data/traces"),
    requests: int = typer.Option(2000, help="requests per trace"),
    slo_ms: Optional[float] = typer.Option(None, help="latency SLO for the planner"),
    eval_json: Optional[Path] = typer.Option(None, help="accuracy per strategy (mercury-onnx eval --json)"),
    images: Optional[Path] = typer.Option(None, help="real images for the JPEG and codec payload sizes (default: "
                                          "CIFAR-10 test; ../shared/data/imagenet-sample for 224-px models)"),
    jpeg_images: int = typer.Option(64, help="how many images to JPEG-encode"),
    images_skip: int = typer.Option(0, help="leave out the first N images in sorted order (e.g. the "
                                             "photos the codec was fit on: --codec-images of a flat folder)"),
    hq_size: int = typer.Option(1024, help="side of the cloud-only-hq upload"),
    interval_ms: float = typer.Option(500.0, help="time between a stream's requests"),
    seed: int = typer.Option(0),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results JSON here"),
    plot_dir: Optional[Path] = typer.Option(None, help="write PNG plots here"),
    band: bool = typer.Option(False, "--band", help="also the band of constant uplink rates (0.01-100 Mbps) "
                                                    "where Mercury beats mobile-only and cloud-only-jpeg"),
) -> None:
    """Latency, payload, energy and accuracy of mobile-only, cloud-only, Mercury, Janus-like
    and the adaptive planner over real 5G/LTE traces."""
    from .bench import BenchConfig, default_images, load_eval, run_bench, sample_images
    from .bench_setup import BenchError, resolve_cloud, resolve_device, setup_from_export, setup_from_name
    from .bench_report import format_table, plot
    from .network import TraceError, default_traces_dir, load_trace
    from .profiles import ProfileError
    from ..formats.images import ImageError
    from ..formats.manifest import ManifestError

    if (export_dir is None) == (model is None):
        fail("give an EXPORT_DIR or --model NAME (not both)")
    if requests < 1:
        fail("--requests must be >= 1")
    try:
        setup = (setup_from_export(export_dir) if export_dir is not None
                 else setup_from_name(model, list(keep_ratio), img_size, patch_size, num_classes, prune_point))
        traces = [load_trace(t, traces_dir) for t in trace]
        img_dir = images or default_images(setup.input_size, default_traces_dir().parents[0])
        if not img_dir.exists():
            raise BenchError(f"no images at {img_dir}: pass --images DIR (real photos for the JPEG sizes)")
        files = sample_images(img_dir, jpeg_images, images_skip)
        evals = load_eval(eval_json)
        shipped = None
        if eval_json is None and setup.manifest is not None:
            from .shipped import shipped_accuracy
            shipped = shipped_accuracy(setup.manifest)
            if shipped:
                evals = shipped[0]
                typer.echo(f"top-1: the shipped reference calibration's committed figures "
                           f"({shipped[1]['images']} images of {shipped[1]['dataset']})")
        dev = resolve_device(device, setup, typer.echo)
        cld = resolve_cloud(cloud, server, setup, typer.echo)
        cfg = BenchConfig(traces=traces, requests=requests, slo_ms=slo_ms, hq_size=hq_size,
                          interval_ms=interval_ms, seed=seed, band=band)
        report, curves = run_bench(setup, dev, cld, files, cfg, evals,
                                   progress=lambda t: typer.echo(f"  trace {t} done", err=True))
    except (BenchError, TraceError, ProfileError, ManifestError, ImageError) as e:
        fail(str(e))
    report["images"] = {"folder": shown_path(img_dir), "count": len(files)}
    if eval_json:
        from .bench import eval_source
        report["accuracy_source"] = eval_source(eval_json)
    elif shipped:
        report["accuracy_source"] = shipped[1]
    typer.echo(format_table(report))
    if band:
        from .band import format_band, plot_band
        typer.echo("\n" + format_band(report["band"], report["model"], report["device"]))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
        typer.echo(f"\nJSON: {json_out}")
    if plot_dir:
        written = plot(report, curves, plot_dir)
        if band:
            bp = plot_band(report["band"], f"{report['model']} on {report['device']}: mean latency vs uplink rate",
                           plot_dir / "band.png")
            written += [bp] if bp else []
        typer.echo(f"plots: {', '.join(map(str, written))}" if written else "plots skipped: matplotlib not installed")

def profile(
    export: Path = typer.Option(..., "--export", help="export folder whose graphs to time"),
    out: Path = typer.Option(..., "--out", help="profile JSON to write"),
    name: Optional[str] = typer.Option(None, help="profile name (default: this machine's hostname)"),
    repeats: int = typer.Option(10),
    active_w: Optional[float] = typer.Option(None, help="measured whole-device power under load (W)"),
    idle_w: Optional[float] = typer.Option(None, help="measured idle power (W)"),
) -> None:
    """Measure this device (run it on the real device): effective GFLOP/s from full.onnx,
    and the time of every head. Use the JSON with `bench --device FILE.json`."""
    import platform

    from .bench_setup import BenchError, graph_flops, setup_from_export
    from .profiles import measure_device
    from ..formats.manifest import ManifestError

    try:
        setup = setup_from_export(export)
    except (BenchError, ManifestError) as e:
        fail(str(e))
    prof = measure_device(export, setup.manifest, graph_flops(setup), name or platform.node(), repeats,
                          progress=lambda f, ms: typer.echo(f"  {f}: {ms:.2f} ms"))
    if active_w is not None and idle_w is not None:
        prof.active_w, prof.idle_w = active_w, idle_w
        prof.power_source = "measured by the user (--active-w/--idle-w)"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof.to_json(), indent=1))
    typer.echo(f"{prof.name}: {prof.gflops:.2f} GFLOP/s effective ({prof.gflops_source}) -> {out}")
