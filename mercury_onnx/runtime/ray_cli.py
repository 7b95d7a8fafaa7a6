"""serve-tail --engine ray (and --kuberay-manifest): check the options, then deploy or write YAML.

Kept apart from ray_engine.py so that a bad flag or a missing [scale] extra is a one-line
error before anything imports Ray, and the manifest can be written without Ray installed.
"""
from __future__ import annotations

import importlib.util
import os

import typer

from ..app import fail
from .ray_config import LOOPBACK_ENV, parse_autoscale


def serve_ray(export_dir: str, *, host: str, port: int, address: str | None, kuberay_manifest: str | None,
              **args) -> None:
    from ..formats.manifest import ManifestError
    from .protocol import served_models

    if args["autoscale"] is not None:
        try:
            lo, hi = (int(x) for x in parse_autoscale(args["autoscale"]))
        except ValueError as e:
            fail(str(e))
        args["autoscale"] = (lo, hi)
    if args["replicas"] < 1:
        fail("--replicas must be >= 1")
    if args["num_cpus"] < 0 or args["num_gpus"] < 0:
        fail("--num-cpus and --num-gpus must be >= 0")
    if args["num_gpus"] and args["provider"] == "cpu":
        fail("--num-gpus > 0 with --provider cpu: a GPU replica runs the tail on CUDA")
    if args["target_ongoing"] is not None and args["target_ongoing"] <= 0:
        fail("--target-ongoing must be > 0")
    if args["max_ongoing"] is not None and args["max_ongoing"] < args["max_batch"]:
        fail(f"--max-ongoing {args['max_ongoing']} < --max-batch {args['max_batch']}: batches could never fill")
    try:
        models = served_models(export_dir, args["keep_ratios"], args["tail_dtype"])
    except ManifestError as e:
        fail(str(e))
    names, model_id = list(models), next(iter(models.values())).model_id

    if kuberay_manifest:
        from .kuberay import rayservice_yaml

        text = rayservice_yaml(export_dir, names, model_id, port=port, **args)
        with open(kuberay_manifest, "w") as f:
            f.write(text)
        typer.echo(f"wrote the KubeRay RayService for {', '.join(names)} to {kuberay_manifest} "
                   f"(kubectl apply -f {kuberay_manifest}; the export folder must be in the image or a volume)",
                   err=True)
        return
    if importlib.util.find_spec("ray") is None:
        fail("--engine ray needs Ray Serve: pip install 'mercury-onnx[scale]'")
    if not address:   # a one-machine cluster talks over loopback only (Ray's switch for that)
        os.environ.setdefault(LOOPBACK_ENV, "0")
    from .ray_engine import serve_forever

    scale = (f"autoscale {args['autoscale'][0]}..{args['autoscale'][1]} replicas" if args["autoscale"]
             else f"{args['replicas']} replica(s)")
    typer.echo(f"serving {', '.join(names)} from {export_dir} (model id {model_id}) on Ray Serve "
               f"at http://{host}:{port} [{scale} each, {args['num_cpus']:g} CPU / {args['num_gpus']:g} GPU per "
               f"replica, max batch {args['max_batch']}, max delay {args['max_delay_ms']:g} ms"
               f"{', bearer token required' if args['auth_token'] else ''}]", err=True)
    try:
        serve_forever({"export_dir": export_dir, **args}, host, port, address,
                      log=lambda msg: typer.echo(msg, err=True))
    except KeyboardInterrupt:
        pass
