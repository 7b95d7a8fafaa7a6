"""serve-tail --engine ray under load, paired in one run (`serve_load.py EXPORT --engine ray`).

    python benchmarks/serve_load.py EXPORT_DIR --engine ray [--keep-ratio R] [--clients 32]
        [--requests 192] [--rounds 3] [--max-batch 16] [--max-delay-ms 2] [--max-ongoing N] [--json F]

Three servers, each measured once per round, in alternating order (A B C, C B A, ...), at C
closed-loop clients sending single-image binary KServe v2 requests (serve_load.py's load
generator, after a warm-up):
  standalone  serve-tail in a subprocess, 1 ORT thread
  ray x1      Ray Serve (local cluster on loopback, 2 logical CPUs, ray_config.SYSTEM_CONFIG and
              SERVE_ENV), 1 replica x 1 ORT thread: the layout of serve-tail --engine ray
              (ray_engine.deploy: the model's application at /v2/models/{model}, whose tail
              replicas take the proxy's requests, and the front `mercury` at /)
  ray x2      the same deployment rescaled in place to 2 replicas x 1 ORT thread
Per round: ray x2 / ray x1 throughput (target >= 1.6x), ray x1 / standalone (>= 0.8x), and
p99/p50 of each (<= 2x); the medians over rounds are the result. "ORT busy": seconds of tail
runs per wall second (/metrics' mercury_tail_seconds, summed over replicas: 1.0 = one replica's
ORT never idle), which shows a replica that waits for work.
No CPU pinning: two replicas need both cores. Where the cores went during each run's measured
requests (not its warm-up) is read from /proc (CPU seconds / wall seconds, so 1.0 = one core
busy): tail replicas, the Ray front (`ingress`: health, /metrics), the Ray HTTP proxy, the
other Ray processes (controller, GCS, raylet, agents), the
standalone server, this process (the load generator and the Ray driver), and everything else
on the machine (other users' jobs: /proc/stat busy time minus ours). A run during which those
other jobs took more than --max-other-cores (default 0.25) is measured again after 20 s, up to
--retries times (default 3); the discarded runs stay in the JSON (`discarded` of their round). On a shared machine the
throughput follows the share of the cores each server gets, so the run also prints images
per CPU-second of the serving processes (Ray: replicas + ingress + proxy + other Ray).
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time
import urllib.request

from serve_load import load, one_image, process_cpu_s

from mercury_onnx.runtime.client import build_request
from mercury_onnx.runtime.ray_config import LOOPBACK_ENV, SERVE_ENV, SYSTEM_CONFIG, max_ongoing
from mercury_onnx.runtime.server import free_port, spawn

# Ray's /metrics sums what the tail replicas report every ray_engine.PUSH_S (1 s): wait this
# long before reading it (outside the measured window)
SETTLE_S = 2.5
# the processes that serve, per server (for images per CPU-second)
SERVER_GROUPS = {"standalone": ("standalone",), "ray x1": ("tail replicas", "ingress", "proxy", "other ray"),
                 "ray x2": ("tail replicas", "ingress", "proxy", "other ray")}
GROUPS = (("ray::ServeReplica:mercury_tail", "tail replicas"), ("ray::ServeReplica:mercury:ingress", "ingress"),
          ("ray::ProxyActor", "proxy"))


def descendants(root: int) -> list[int]:
    """root and every process below it (/proc ppid links)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_by_group(standalone_pid: int) -> dict[str, float]:
    """CPU seconds so far of each group of our processes, and the machine's busy seconds."""
    me = os.getpid()
    sa = set(descendants(standalone_pid))
    out = {"tail replicas": 0.0, "ingress": 0.0, "proxy": 0.0, "other ray": 0.0, "standalone": 0.0,
           "load generator + driver": 0.0}
    for pid in descendants(me):
        try:
            cpu = process_cpu_s(pid)
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        group = "load generator + driver" if pid == me else "standalone" if pid in sa else \
            next((g for prefix, g in GROUPS if cmd.startswith(prefix)), "other ray")
        out[group] += cpu
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    out["machine busy"] = sum(fields[i] for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")   # user nice system irq softirq
    return out


def cores(before: dict, after: dict, wall: float) -> dict[str, float]:
    used = {k: (after[k] - before[k]) / wall for k in before}
    ours = sum(v for k, v in used.items() if k != "machine busy")
    used["everything else"] = max(0.0, used.pop("machine busy") - ours)
    return {k: round(v, 2) for k, v in used.items()}


def main(args) -> None:
    os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray
    from ray import serve

    from mercury_onnx.runtime.ray_engine import QUIET, deploy as deploy_apps

    clients = int(args.clients.split(",")[-1])
    requests = args.requests
    manifest, v, model, out = one_image(args.export_dir, args.keep_ratio)
    body, hlen = build_request({"tokens": out["tokens"], "indices": out["indices"]}, {"model_id": manifest["model_id"]})
    load_avg = os.getloadavg()
    mo = max_ongoing({"max_batch": args.max_batch, "max_ongoing": args.max_ongoing})
    print(f"export {args.export_dir}: {manifest['timm_model']} {manifest.get('overrides') or ''}, {model} "
          f"(K={v['keep_tokens']}, D={manifest['dim']}), {clients} clients, {requests} requests per run, "
          f"max batch {args.max_batch}, max delay {args.max_delay_ms:g} ms, 1 ORT thread per server/replica "
          f"(Ray: max_ongoing_requests {mo} per replica); "
          f"{os.cpu_count()} CPUs, load average {load_avg[0]:.1f} {load_avg[1]:.1f} {load_avg[2]:.1f}")

    common = ["--provider", "cpu", "--threads", "1", "--max-batch", str(args.max_batch), "--max-delay-ms",
              str(args.max_delay_ms), "--keep-ratio", str(v["keep_ratio"]), "--timeout-s", "120"]
    sa_proc, sa_url = spawn(args.export_dir, *common, ready_timeout=300)
    os.environ.update(SERVE_ENV)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _system_config=SYSTEM_CONFIG)   # the cluster serve-tail --engine ray starts
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    ray_url = f"http://127.0.0.1:{port}"
    base = dict(export_dir=args.export_dir, keep_ratios=[v["keep_ratio"]], provider="cpu", threads=1, num_cpus=1,
                max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, max_ongoing=mo, timeout_s=120)
    current = {"n": 0}

    def deploy(n: int) -> None:
        if current["n"] == n:
            return
        t0 = time.monotonic()
        deploy_apps({**base, "replicas": n})
        while serve.status().applications[model].deployments[model].replica_states != {"RUNNING": n}:
            if time.monotonic() - t0 > 300:
                raise SystemExit(f"Ray did not reach {n} running replicas in 300 s")
            time.sleep(0.5)
        while True:
            try:
                with urllib.request.urlopen(ray_url + "/v2/health/ready", timeout=10) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        current["n"] = n

    servers = {"standalone": (sa_url, None), "ray x1": (ray_url, 1), "ray x2": (ray_url, 2)}
    rounds = []
    try:
        for i in range(args.rounds):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            row = {}
            for name in order:
                url, n = servers[name]
                if n:
                    deploy(n)
                for attempt in range(args.retries + 1):
                    r = measure(name, sa_proc.pid, functools.partial(load, url, model, body, hlen, clients, requests, None))
                    print(f"round {i + 1} {name:10s}: {r['req_s']:6.2f} images/s, p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, "
                          f"errors {r['errors']}, mean batch {r['mean_batch']:.1f}, ORT busy {r['ort_busy']:.2f}, "
                          f"{r['images_per_cpu_s']:.1f} images per server CPU-second; cores: {r['cores']}", flush=True)
                    if r["cores"]["everything else"] <= args.max_other_cores or attempt == args.retries:
                        break
                    print(f"  other jobs took {r['cores']['everything else']:.2f} cores (> {args.max_other_cores:g}): "
                          f"measuring {name} again in 20 s", flush=True)
                    row.setdefault("discarded", []).append({"server": name, **r})
                    time.sleep(20)
                row[name] = r
            row["x2/x1"] = row["ray x2"]["req_s"] / row["ray x1"]["req_s"]
            row["x1/standalone"] = row["ray x1"]["req_s"] / row["standalone"]["req_s"]
            rounds.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
        sa_proc.terminate()
        sa_proc.wait(30)
    report(rounds, args, load_avg, clients, requests, model, manifest, mo)


def measure(name: str, sa_pid: int, run) -> dict:
    """One load run of one server, with where the cores went during its measured requests."""
    marks = {}

    def window(what: str) -> None:
        marks[what] = (cpu_by_group(sa_pid), time.perf_counter())

    r = run(settle_s=SETTLE_S, window=window)                           # warm-up + measured run
    (before, t0), (after, t1) = marks["start"], marks["end"]
    r["cores"] = cores(before, after, t1 - t0)
    r.pop("cpu_ms")
    busy = sum(r["cores"][g] for g in SERVER_GROUPS[name])
    r["images_per_cpu_s"] = r["req_s"] / busy if busy else float("nan")   # what share it got aside
    return r


def report(rounds: list[dict], args, load_avg, clients: int, requests: int, model: str, manifest: dict,
           mo: int) -> None:
    med = lambda xs: statistics.median(xs)   # noqa: E731
    print("\n| round | standalone images/s | ray x1 images/s | ray x2 images/s | x2 / x1 (>= 1.6) | x1 / standalone (>= 0.8) "
          "| p99/p50 standalone / x1 / x2 (<= 2) |\n|---:|---:|---:|---:|---:|---:|---|")
    for i, r in enumerate(rounds):
        pp = " / ".join(f"{r[n]['p99'] / r[n]['p50']:.2f}" for n in ("standalone", "ray x1", "ray x2"))
        print(f"| {i + 1} | {r['standalone']['req_s']:.2f} | {r['ray x1']['req_s']:.2f} | {r['ray x2']['req_s']:.2f} "
              f"| {r['x2/x1']:.2f}x | {r['x1/standalone']:.2f}x | {pp} |")
    summary = {"x2/x1": med([r["x2/x1"] for r in rounds]), "x1/standalone": med([r["x1/standalone"] for r in rounds]),
               **{f"p99/p50 {n}": med([r[n]["p99"] / r[n]["p50"] for r in rounds])
                  for n in ("standalone", "ray x1", "ray x2")}}
    print(f"| median | | | | {summary['x2/x1']:.2f}x | {summary['x1/standalone']:.2f}x | "
          f"{summary['p99/p50 standalone']:.2f} / {summary['p99/p50 ray x1']:.2f} / {summary['p99/p50 ray x2']:.2f} |")
    print("\nORT busy (seconds of tail runs per second, all replicas; median): " + ", ".join(
        f"{n} {med([r[n]['ort_busy'] for r in rounds]):.2f}" for n in ("standalone", "ray x1", "ray x2")))
    print("\nImages per CPU-second of the serving processes (median; independent of the share of the\n"
          "machine each got): " + ", ".join(f"{n} {med([r[n]['images_per_cpu_s'] for r in rounds]):.2f}"
                                            for n in ("standalone", "ray x1", "ray x2")))
    print("\nWhere the cores went (cores busy during the run, median over rounds):\n")
    groups = list(rounds[0]["standalone"]["cores"])
    print("| server | " + " | ".join(groups) + " |\n|---|" + "---:|" * len(groups))
    for n in ("standalone", "ray x1", "ray x2"):
        print(f"| {n} | " + " | ".join(f"{med([r[n]['cores'][g] for r in rounds]):.2f}" for g in groups) + " |")
    end = os.getloadavg()
    print(f"\nload average at the end {end[0]:.1f} {end[1]:.1f} {end[2]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timm_model": manifest["timm_model"], "model": model, "cpus": os.cpu_count(), "clients": clients, "requests": requests,
                       "max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms,
                       "max_ongoing": mo, "max_other_cores": args.max_other_cores,
                       "load_average_start": load_avg, "load_average_end": end, "rounds": rounds,
                       "median": summary}, f, indent=1)
        print(f"wrote {args.json}")
