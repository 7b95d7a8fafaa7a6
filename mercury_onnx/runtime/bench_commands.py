"""CLI commands of this area: bench, profile, demo.

Keep module-level imports light (no torch/timm/onnx): import inside each command.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def resolve_device(spec: str, setup, progress=print):
    """pi | host | FILE.json -> DeviceProfile. `host`, and `pi` when running on a Raspberry Pi,
    measure the export's graphs on this machine."""
    from .bench import BenchError, graph_flops
    from .profiles import is_raspberry_pi, load_device_profile, measure_device

    measure = spec == "host" or (spec == "pi" and is_raspberry_pi())
    if not measure:
        return load_device_profile(spec)
    if setup.export_dir is None:
        raise BenchError(f"--device {spec} measures the exported graphs on this machine: give an EXPORT_DIR")
    progress(f"measuring the device graphs on this machine ({spec})")
    return measure_device(setup.export_dir, setup.manifest, graph_flops(setup), spec,
                          progress=lambda f, ms: progress(f"  {f}: {ms:.2f} ms"))


def resolve_cloud(spec: str, server: str | None, setup, progress=print):
    """rtx4090 (modelled) | local (ORT CPU here); --server times each tail on serve-tail."""
    import numpy as np

    from .bench import BenchError
    from .profiles import CloudProfile, rtx4090_cloud, time_graph

    if spec == "rtx4090":
        cloud = rtx4090_cloud()
    elif spec == "local":
        if setup.export_dir is None:
            raise BenchError("--cloud local measures the exported tail graphs: give an EXPORT_DIR")
        m, ms = setup.manifest, {}
        progress("measuring the cloud graphs on this machine (onnxruntime CPU)")
        from .profiles import image_feed
        ms[m["full"]["file"]] = time_graph(setup.export_dir / m["full"]["file"], image_feed(m))
        for v in m["variants"]:
            k, d = v["keep_tokens"], m["dim"]
            feeds = {"tokens": np.random.default_rng(0).standard_normal((1, 1 + k, d)).astype(np.float32),
                     "indices": np.arange(k, dtype=np.int64)[None] * (m["num_patches"] // k)}
            ms[v["tail"]["file"]] = time_graph(setup.export_dir / v["tail"]["file"], feeds)
        from .bench import graph_flops
        full_flops = graph_flops(setup)["full"]
        cloud = CloudProfile("local", full_flops / (ms[m["full"]["file"]] * 1e-3) / 1e9,
                             "measured: onnxruntime CPU on this machine, batch 1, median; graphs not "
                             "exported (janus-like) scaled by FLOPs from full.onnx's time (modelled)", ms)
    else:
        raise BenchError(f"unknown --cloud {spec!r}: use rtx4090 (modelled) or local (measured here)")
    if server:
        if setup.export_dir is None:
            raise BenchError("--server needs an EXPORT_DIR (the tails it serves)")
        from .client import KServeClient
        from .tail import model_name
        import time
        c = KServeClient(server, timeout=10.0)
        if not c.ready():
            raise BenchError(f"serve-tail at {server} is not ready")
        m = setup.manifest
        for v in m["variants"]:
            k, d = v["keep_tokens"], m["dim"]
            inputs = {"tokens": np.zeros((1, 1 + k, d), np.float32),
                      "indices": (np.arange(k, dtype=np.int64) * (m["num_patches"] // k))[None]}
            times = []
            for i in range(12):
                t = time.perf_counter()
                c.infer(model_name(k), inputs, {"model_id": m.get("model_id")})
                if i >= 2:
                    times.append((time.perf_counter() - t) * 1e3)
            cloud.graph_ms[v["tail"]["file"]] = float(np.median(times))
        cloud.source += f"; tails measured as serve-tail round trips on {server} (includes the local HTTP hop)"
        c.close()
    return cloud


def register(app) -> None:
    from ..cli import fail

    @app.command()
    def bench(
        export_dir: Optional[Path] = typer.Argument(None, help="export folder (or use --model)"),
        model: Optional[str] = typer.Option(None, help="timm name, no export: every compute figure modelled"),
        keep_ratio: List[float] = typer.Option([0.5, 0.25], "--keep-ratio", "-r", help="with --model"),
        img_size: Optional[int] = typer.Option(None, help="with --model"),
        patch_size: Optional[int] = typer.Option(None, help="with --model"),
        num_classes: int = typer.Option(1000, help="with --model"),
        device: str = typer.Option("pi", help="pi | host | profile JSON from `mercury-onnx profile`"),
        cloud: str = typer.Option("rtx4090", help="rtx4090 (paper's 0.86 ms DeiT-B, modelled) | local (measured here)"),
        server: Optional[str] = typer.Option(None, help="serve-tail URL: time the tails on it"),
        trace: List[str] = typer.Option(["5g-driving", "lte-driving"], "--trace", "-t"),
        traces_dir: Optional[Path] = typer.Option(None, help="default ../shared/data/traces"),
        requests: int = typer.Option(2000, help="requests per trace"),
        slo_ms: Optional[float] = typer.Option(None, help="latency SLO for the planner"),
        eval_json: Optional[Path] = typer.Option(None, help="accuracy per strategy (mercury-onnx eval --json)"),
        images: Optional[Path] = typer.Option(None, help="real images for the JPEG sizes (default CIFAR-10 test)"),
        jpeg_images: int = typer.Option(64, help="how many images to JPEG-encode"),
        hq_size: int = typer.Option(1024, help="side of the cloud-only-hq upload"),
        interval_ms: float = typer.Option(500.0, help="time between a stream's requests"),
        seed: int = typer.Option(0),
        json_out: Optional[Path] = typer.Option(None, "--json", help="write the results JSON here"),
        plot_dir: Optional[Path] = typer.Option(None, help="write PNG plots here"),
    ) -> None:
        """Latency, payload, energy and accuracy of mobile-only, cloud-only, Mercury, Janus-like
        and the adaptive planner over real 5G/LTE traces."""
        from .bench import (BenchConfig, BenchError, list_images, load_eval, run_bench,
                            setup_from_export, setup_from_name)
        from .bench_report import format_table, plot
        from .network import TraceError, default_traces_dir, load_trace
        from .profiles import ProfileError
        from ..export.manifest import ManifestError

        if (export_dir is None) == (model is None):
            fail("give an EXPORT_DIR or --model NAME (not both)")
        if requests < 1:
            fail("--requests must be >= 1")
        try:
            setup = (setup_from_export(export_dir) if export_dir is not None
                     else setup_from_name(model, list(keep_ratio), img_size, patch_size, num_classes))
            traces = [load_trace(t, traces_dir) for t in trace]
            img_dir = images or default_traces_dir().parents[0] / "cifar10" / "test"
            if not img_dir.exists():
                raise BenchError(f"no images at {img_dir}: pass --images DIR (real photos for the JPEG sizes)")
            files = list_images(img_dir, jpeg_images)
            evals = load_eval(eval_json)
            dev = resolve_device(device, setup, typer.echo)
            cld = resolve_cloud(cloud, server, setup, typer.echo)
            cfg = BenchConfig(traces=traces, requests=requests, slo_ms=slo_ms, hq_size=hq_size,
                              interval_ms=interval_ms, seed=seed)
            report, curves = run_bench(setup, dev, cld, files, cfg, evals,
                                       progress=lambda t: typer.echo(f"  trace {t} done", err=True))
        except (BenchError, TraceError, ProfileError, ManifestError) as e:
            fail(str(e))
        report["images"] = {"folder": str(img_dir), "count": len(files)}
        if eval_json:
            from .bench import eval_source
            report["accuracy_source"] = eval_source(eval_json)
        typer.echo(format_table(report))
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=1))
            typer.echo(f"\nJSON: {json_out}")
        if plot_dir:
            written = plot(report, curves, plot_dir)
            typer.echo(f"plots: {', '.join(map(str, written))}" if written else "plots skipped: matplotlib not installed")

    @app.command()
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

        from .bench import BenchError, graph_flops, setup_from_export
        from .profiles import measure_device
        from ..export.manifest import ManifestError

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

    @app.command()
    def demo(
        model: Optional[str] = typer.Option(None, help="timm name or backbone JSON (default: the reference "
                                                         "checkpoint in ../shared/models)"),
        data: Optional[Path] = typer.Option(None, help="test images DIR/<class>/<image> (default CIFAR-10 test)"),
        train_data: Optional[Path] = typer.Option(None, help="calibration images (default DATA/../train)"),
        images: int = typer.Option(100, help="test images sent through the server"),
        keep_ratio: List[float] = typer.Option([0.5, 0.25], "--keep-ratio", "-r"),
        token_dtype: str = typer.Option("int8", help="int8 | fp16 tokens on the wire"),
        calib_images: int = typer.Option(500), calib_steps: int = typer.Option(10),
        calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate"),
        trace: str = typer.Option("5g-driving", help="trace for the short bench"),
        requests: int = typer.Option(500, help="requests in the short bench"),
        cache: Optional[Path] = typer.Option(None, help="default ~/.cache/mercury-onnx/demo"),
    ) -> None:
        """The whole system end to end on loopback: calibrate, export, serve-tail, client on real
        images (accuracy vs vanilla, measured latency), and a short bench on a 5G trace."""
        from ..cli import need_export_extra
        from .demo import DemoError, DemoOptions, run_demo

        need_export_extra("demo")
        if images < 1 or requests < 1:
            fail("--images and --requests must be >= 1")
        if token_dtype not in ("int8", "fp16"):
            fail("--token-dtype: int8 or fp16")
        opts = DemoOptions(model=model, data=data, train_data=train_data, images=images,
                           keep_ratios=list(keep_ratio), token_dtype=token_dtype, calib_images=calib_images,
                           calib_steps=calib_steps, calibrate=calibrate, trace=trace, requests=requests)
        if cache is not None:
            opts.cache = cache
        try:
            run_demo(opts, typer.echo)
        except DemoError as e:
            fail(str(e))
