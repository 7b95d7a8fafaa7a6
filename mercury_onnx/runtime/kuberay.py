"""A KubeRay RayService manifest for serve-tail --engine ray (`--kuberay-manifest FILE`).

The RayService runs the same Serve applications as `serve-tail --engine ray`
(ray_config.applications): its serveConfigV2 names, for each served model (mercury_tail_k{K}),
an application at /v2/models/{model} built by `mercury_onnx.runtime.ray_engine:build_tail`,
whose one deployment has the replica count or autoscaling bounds and per-replica CPUs/GPUs,
and the front application `mercury` at / (`ray_engine:build`, deployment `ingress`), all with
the same arguments. The cluster: a head pod (no replicas on it: num-cpus 0) and a worker group
sized for the largest replica count, both with ray_config.SYSTEM_CONFIG as RAY_* environment
variables and ray_config.SERVE_ENV. Ports: 8000 serve (KServe v2 REST), 6379 GCS,
8265 dashboard, 10001 client.

The export folder must be inside the container image at the same path, or on the volume this
manifest mounts (a PersistentVolumeClaim named mercury-export, read-only, at EXPORT_DIR).
The image is a placeholder: an image with `pip install 'mercury-onnx[scale,cloud]'`.
Not run here (no Kubernetes on this machine); the tests check its structure only.
Needs PyYAML (a dependency of Ray, in the [scale] extra). No Ray import.
"""
from __future__ import annotations

import math
import os

from .ray_config import APP_NAME, INGRESS, SERVE_ENV, SYSTEM_CONFIG, applications, max_ongoing

SERVE_PORT, GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 8000, 6379, 8265, 10001
IMAGE = "mercury-onnx:scale"   # placeholder: build it from this repo with the [scale,cloud] extras


def _container(name: str, image: str, cpu: float, memory: str, gpus: float, export_dir: str,
               ports: list[tuple[str, int]]) -> dict:
    limits = {"cpu": _cpu(cpu), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = int(math.ceil(gpus))
    c = {"name": name, "image": image,
         "resources": {"limits": limits, "requests": {"cpu": _cpu(cpu), "memory": memory}},
         "volumeMounts": [{"name": "export", "mountPath": export_dir, "readOnly": True}]}
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    return c


def _cpu(cpu: float) -> str:
    return str(int(cpu)) if float(cpu).is_integer() else f"{int(cpu * 1000)}m"


def rayservice(export_dir: str, models: list[str], model_id: str, *, port: int = SERVE_PORT,
               name: str = "mercury-tail", image: str = IMAGE, **args) -> dict:
    """The RayService object (a dict). `args` are build()'s (ray_engine.DEFAULTS)."""
    export_dir = os.path.abspath(export_dir)
    replicas, autoscale = int(args.get("replicas") or 1), args.get("autoscale")
    hi = autoscale[1] if autoscale else replicas
    num_cpus, num_gpus = float(args.get("num_cpus") or 1), float(args.get("num_gpus") or 0)
    app_args = {k: v for k, v in args.items() if v is not None}
    app_args.pop("auth_token", None)   # a secret: from the environment (MERCURY_AUTH_TOKEN), not the manifest
    app_args["export_dir"] = export_dir
    if autoscale:
        app_args["autoscale"] = f"{autoscale[0]}:{autoscale[1]}"
    tail = {"max_ongoing_requests": max_ongoing(args), "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if autoscale:
        tail["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1]}
    else:
        tail["num_replicas"] = replicas
    import yaml

    serve_config = {"http_options": {"host": "0.0.0.0", "port": port}, "applications": [
        {"name": app, "route_prefix": route, "import_path": path, "args": {**app_args, **extra},
         "deployments": [{"name": INGRESS, "num_replicas": 1} if app == APP_NAME else {"name": app, **tail}]}
        for app, route, path, extra in applications(models)]}
    # one worker pod per replica slot of every model: replicas x models
    workers = hi * len(models)
    worker_cpu = max(1.0, math.ceil(num_cpus))
    volume = [{"name": "export", "persistentVolumeClaim": {"claimName": "mercury-export", "readOnly": True}}]
    env = [{"name": "MERCURY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "mercury-auth", "key": "token", "optional": True}}}]
    env += [{"name": f"RAY_{k}", "value": str(v)} for k, v in SYSTEM_CONFIG.items()]   # Ray reads RAY_<setting>
    env += [{"name": k, "value": v} for k, v in SERVE_ENV.items()]
    head = _container("ray-head", image, 1, "4Gi", 0, export_dir,
                      [("gcs", GCS_PORT), ("dashboard", DASHBOARD_PORT), ("client", CLIENT_PORT),
                       ("serve", port)])
    head["env"] = env
    worker = _container("ray-worker", image, worker_cpu, "4Gi", num_gpus, export_dir, [])
    worker["env"] = env
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "mercury-onnx"},
                     "annotations": {"mercury-onnx/model-id": model_id, "mercury-onnx/models": ",".join(models)}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": "2.60.0",
                "enableInTreeAutoscaling": bool(autoscale),
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [head], "volumes": volume}}},
                "workerGroupSpecs": [{
                    "groupName": "tails", "replicas": (autoscale[0] if autoscale else replicas) * len(models),
                    "minReplicas": (autoscale[0] if autoscale else replicas) * len(models),
                    "maxReplicas": workers,
                    "rayStartParams": {"num-cpus": str(int(worker_cpu)),
                                       **({"num-gpus": str(int(math.ceil(num_gpus)))} if num_gpus else {})},
                    "template": {"spec": {"containers": [worker], "volumes": volume}}}],
            },
        },
    }


def rayservice_yaml(export_dir: str, models: list[str], model_id: str, **kw) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):   # multi-line strings (serveConfigV2) as `|` blocks, as KubeRay's examples
        pass

    Dumper.add_representer(str, lambda d, s: d.represent_scalar(
        "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))

    head = ("# KubeRay RayService for mercury-onnx serve-tail --engine ray (generated by\n"
            "# `mercury-onnx serve-tail EXPORT --kuberay-manifest FILE`). Apply with kubectl apply -f FILE\n"
            "# on a cluster with the KubeRay operator; the export folder must be on the mercury-export\n"
            "# PersistentVolumeClaim (or in the image) at the path below. The bearer token comes from the\n"
            "# optional secret mercury-auth (key token). Untested on Kubernetes: written, parsed, not run.\n")
    return head + yaml.dump(rayservice(export_dir, models, model_id, **kw), Dumper=Dumper, sort_keys=False)
