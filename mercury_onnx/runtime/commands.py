"""CLI commands of this area: serve-tail (cloud) and infer (device).

Keep module-level imports light (no torch/timm/onnx): import inside each command.
"""
from __future__ import annotations

import math
from typing import List, Optional

import typer

from ..app import fail


def serve_tail(
    export_dir: str = typer.Argument(..., help="export folder (manifest.json + tail_k*.onnx)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)"),
    port: int = typer.Option(8000),
    provider: str = typer.Option("auto", help="auto | cuda | cpu (cuda fails if unavailable)"),
    max_batch: int = typer.Option(16, help="most images per tail run (dynamic batching)"),
    max_delay_ms: float = typer.Option(2.0, help="longest wait for a batch to fill"),
    auth_token: Optional[str] = typer.Option(None, envvar="MERCURY_AUTH_TOKEN",
                                             help="require 'Authorization: Bearer T'"),
    max_body_mb: float = typer.Option(16.0, help="largest request body accepted"),
    timeout_s: float = typer.Option(10.0, help="per-request timeout inside the server"),
    threads: Optional[int] = typer.Option(None, help="ORT intra-op threads (default: ORT's)"),
    tail_dtype: str = typer.Option("float32", help="float32 | float16 (the tail_fp16 export)"),
    keep_ratio: List[float] = typer.Option([], "--keep-ratio", "-r", help="serve only these (default all)"),
    engine: str = typer.Option("standalone", help="standalone (one process) | ray (Ray Serve replicas)"),
    replicas: int = typer.Option(1, help="ray: replicas per keep ratio"),
    autoscale: Optional[str] = typer.Option(None, help="ray: MIN:MAX replicas, scaled on ongoing requests"),
    target_ongoing: Optional[float] = typer.Option(None, help="ray: autoscaling target of ongoing "
                                                   "requests per replica (default: --max-batch)"),
    max_ongoing: Optional[int] = typer.Option(None, help="ray: requests one replica holds at once, queued + "
                                              "running (default: max(64, 2 x --max-batch))"),
    upscale_delay_s: float = typer.Option(30.0, help="ray: load must stay above target this long to add a replica"),
    downscale_delay_s: float = typer.Option(600.0, help="ray: ... below target this long to remove one"),
    address: Optional[str] = typer.Option(None, help="ray: auto | HOST:PORT of a running cluster "
                                          "(default: start a local one)"),
    num_cpus: float = typer.Option(1.0, help="ray: CPUs per replica (ORT threads default to this)"),
    num_gpus: float = typer.Option(0.0, help="ray: GPUs per replica (> 0: CUDA provider, checked)"),
    kuberay_manifest: Optional[str] = typer.Option(None, help="ray: write a KubeRay RayService YAML "
                                                   "for these options to FILE and exit"),
) -> None:
    """Serve the tail over the KServe v2 / Open Inference Protocol REST API."""
    from ..formats.manifest import ManifestError
    from .tail import ProviderError

    if max_batch < 1 or max_delay_ms < 0 or max_body_mb <= 0 or timeout_s <= 0:
        fail("--max-batch must be >= 1, --max-delay-ms >= 0, --max-body-mb and --timeout-s > 0")
    if engine not in ("standalone", "ray"):
        fail(f"--engine {engine!r}: use standalone or ray")
    if engine == "ray" or kuberay_manifest:
        from .ray_cli import serve_ray

        return serve_ray(export_dir, host=host, port=port, provider=provider, max_batch=max_batch,
                         max_delay_ms=max_delay_ms, auth_token=auth_token, max_body_mb=max_body_mb,
                         timeout_s=timeout_s, threads=threads, tail_dtype=tail_dtype,
                         keep_ratios=keep_ratio or None, replicas=replicas, autoscale=autoscale,
                         target_ongoing=target_ongoing, max_ongoing=max_ongoing, upscale_delay_s=upscale_delay_s,
                         downscale_delay_s=downscale_delay_s, address=address, num_cpus=num_cpus,
                         num_gpus=num_gpus, kuberay_manifest=kuberay_manifest)
    try:
        from .server import create_app, run
    except ImportError as e:
        fail(f"serve-tail needs the [cloud] extra (starlette, uvicorn): {e}")
    try:
        app = create_app(export_dir, provider=provider, max_batch=max_batch, max_delay_ms=max_delay_ms,
                         auth_token=auth_token, max_body_mb=max_body_mb, timeout_s=timeout_s,
                         threads=threads, tail_dtype=tail_dtype, keep_ratios=keep_ratio or None)
    except (ManifestError, ProviderError) as e:
        fail(str(e))
    typer.echo(f"serving {', '.join(sorted(app.state.models))} from {export_dir} "
               f"(model id {app.state.model_id}) at http://{host}:{port} "
               f"[max batch {max_batch}, max delay {max_delay_ms:g} ms"
               f"{', bearer token required' if auth_token else ''}]", err=True)
    run(app, host, port, timeout_s)


def infer(
    images: List[str] = typer.Argument(..., help="image files (JPEG/PNG)"),
    export: str = typer.Option(..., "--export", help="export folder (the same one the server has)"),
    server: str = typer.Option(..., "--server", help="serve-tail or Triton URL, e.g. http://127.0.0.1:8000"),
    keep_ratio: Optional[float] = typer.Option(None, "--keep-ratio", "-r", help="default: the first exported"),
    token_dtype: str = typer.Option("fp16", help="fp16 | int8 (per-token scales) | fp32"),
    fallback: str = typer.Option("local", help="local: run full.onnx here if the server fails; none: fail"),
    timeout: float = typer.Option(5.0, help="seconds for each network step (connect, send, answer)"),
    auth_token: Optional[str] = typer.Option(None, envvar="MERCURY_AUTH_TOKEN"),
    threads: Optional[int] = typer.Option(None, help="ORT threads for the head"),
    codec: Optional[str] = typer.Option(None, "--codec", help="DxB or eP, e.g. 16x4 or e6: send the codec head's "
                                        "compressed codes (export --codec); --token-dtype is then unused"),
) -> None:
    """Run the head here, the tail on the server; print top-5 and where the time went."""
    from ..formats.images import ImageError
    from ..formats.manifest import ManifestError
    from .client import Client, RequestRejected, ServerError

    if token_dtype not in ("fp16", "int8", "fp32"):
        fail(f"--token-dtype {token_dtype!r}: use fp16, int8 or fp32")
    if fallback not in ("local", "none"):
        fail(f"--fallback {fallback!r}: use local or none")
    if timeout <= 0:
        fail("--timeout must be > 0")
    try:
        client = Client(export, server, keep_ratio, token_dtype, fallback, timeout, auth_token, threads, codec)
    except ManifestError as e:
        fail(str(e))
    try:
        preds = client.predict(images)
    except (ImageError, ManifestError) as e:     # ManifestError: no full.onnx to fall back on
        fail(str(e))
    except (ServerError, RequestRejected) as e:
        fail(f"{e} (no fallback: --fallback none)" if isinstance(e, ServerError) else str(e))
    finally:
        client.close()
    for path, p in zip(images, preds):
        typer.echo(f"{path}:")
        for label, prob in p.top5:
            typer.echo(f"  {prob:7.2%}  {label}")
    b, p = preds[0].breakdown, preds[0]
    if p.where == "local":
        typer.secho(f"fallback: {p.note}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"latency (batch of {len(preds)}): preprocess {b['preprocess']:.2f} ms, "
                   f"full model locally {b['local_full']:.2f} ms, total {b['total']:.2f} ms")
    else:
        if not math.isnan(b["server_total"]):           # reported by serve-tail
            network = b["round_trip"] - b["server_total"]
            server = (f" (in the server {b['server_total']:.2f} ms: tail {b['server_tail']:.2f} ms, "
                      f"queue {b['server_queue']:.2f} ms; network + client HTTP {network:.2f} ms)")
        else:                                           # e.g. Triton: no timing in the response
            server = " (the server reported no timing)"
        typer.echo(f"latency (batch of {len(preds)}, keep ratio {client.variant['keep_ratio']}, "
                   f"{'codec ' + codec if codec else token_dtype + ' tokens'}, {b['payload_bytes']} bytes sent"
                   f"{', codec payload %d bytes' % b['codec_payload_bytes'] if codec else ''}): "
                   f"preprocess {b['preprocess']:.2f} ms, head {b['head']:.2f} ms, "
                   f"encode {b['encode']:.2f} ms, round trip {b['round_trip']:.2f} ms{server}, "
                   f"total {b['total']:.2f} ms")

