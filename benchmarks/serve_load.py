"""serve-tail under load vs a bare ORT session, on loopback.

    python benchmarks/serve_load.py EXPORT_DIR [--keep-ratio 0.25] [--clients 1,8,32]
        [--requests 400] [--max-batch 16] [--max-delay-ms 2] [--threads N]
    python benchmarks/serve_load.py EXPORT_DIR --engine ray [--clients 32] [--rounds 3] [--json F]
        (Ray Serve 2 vs 1 replicas vs standalone, paired: see benchmarks/serve_load_ray.py)

1. Bare ORT: the same tail file in an InferenceSession, back to back at a batch
   (images/s), measured just before and just after each server run; the mean is the reference.
2. serve-tail in a subprocess (CPU provider); C concurrent keep-alive clients, each sending
   single-image binary KServe v2 requests (a fixed total count, after a warm-up), for C in
   --clients: images/s, p50/p99 latency, and the mean batch the server formed (/metrics).
   Compared with bare ORT at batch min(C, max-batch).
3. One client sending max-batch images per request vs bare ORT at that batch (same batch).
Targets: serve-tail >= 0.9x bare ORT throughput; p99 <= 2x p50 at 32 clients.
Also CPU ms per image, server process (all threads, /proc) vs bare ORT (this process): on a
shared, loaded machine wall-clock throughput drifts a lot; CPU cost per image much less.

CPU pinning (Linux, on by default with >= 2 CPUs): the server and the bare-ORT reference run on
the same CPUs (--server-cpus, default all but the last) with the same ORT thread count, and the
load generator runs on the others (--client-cpus, default the last one). Real clients are other
machines; without pinning, the load generator takes its CPU from the server's ORT threads but
not from the bare session's, and the ratio measures the load generator as much as the server.
--no-pin gives the old everything-on-every-CPU run.

The load generator is a minimal asyncio HTTP/1.1 client (prebuilt request bytes) so that
it takes as little CPU as possible from the server: both run on the same machine.
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import numpy as np

from mercury_onnx.formats.manifest import load_manifest, variant
from mercury_onnx.runtime.client import build_request
from mercury_onnx.runtime.head import Head
from mercury_onnx.runtime.server import spawn
from mercury_onnx.runtime.tail import Tail, model_name


def bare_ort(tail: Tail, tokens, indices, batch: int, seconds: float = 3.0) -> tuple[float, float]:
    """images/s and CPU ms per image of tail(tokens[:batch]) run back to back."""
    t, i = np.repeat(tokens, batch, 0), np.repeat(indices, batch, 0)
    for _ in range(3):
        tail(t, i)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        tail(t, i)
        n += 1
    dt, cpu = time.perf_counter() - start, time.process_time() - cpu
    return n * batch / dt, cpu / (n * batch) * 1000


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _client(host, port, request: bytes, count: int, lat: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(count):
            t = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


def load(url: str, model: str, body: bytes, hlen: int, clients: int, total: int, pid: int | None,
         settle_s: float = 0.0, window=None) -> dict:
    """C clients, `total` single-image requests after a warm-up. `settle_s`: wait before each
    /metrics read (a server whose /metrics lags, as Ray's does); `window("start"|"end")` is
    called right around the measured requests."""
    host, port = url.removeprefix("http://").split(":")
    request = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
               f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {hlen}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    per = max(1, total // clients)

    async def run(count):
        lat, errors = [], []
        start = time.perf_counter()
        await asyncio.gather(*(_client(host, int(port), request, count, lat, errors) for _ in range(clients)))
        return lat, errors, time.perf_counter() - start

    asyncio.run(run(max(2, per // 10)))                                 # warm-up
    time.sleep(settle_s)
    before, cpu = metrics(url, model), process_cpu_s(pid) if pid else 0.0
    window and window("start")
    lat, errors, wall = asyncio.run(run(per))
    window and window("end")
    cpu = (process_cpu_s(pid) - cpu) if pid else float("nan")
    time.sleep(settle_s)
    after = metrics(url, model)
    lat = np.array(lat) * 1000
    runs = after["runs"] - before["runs"]
    return {"requests": len(lat), "errors": len(errors), "req_s": len(lat) / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "mean_batch": (after["images"] - before["images"]) / max(runs, 1),
            "ort_busy": (after["tail_s"] - before["tail_s"]) / wall,   # ORT seconds per second, all replicas
            "cpu_ms": cpu / (after["images"] - before["images"]) * 1000}


def metrics(url: str, model: str) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    get = lambda name: float(re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M).group(1))  # noqa: E731
    return {"runs": get("mercury_batch_size_count"), "images": get("mercury_batch_size_sum"),
            "tail_s": get("mercury_tail_seconds_sum")}


def parse_cpus(text: str) -> set[int]:
    """'0', '0,2' or '0-2' -> {0, ...}."""
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def pinning(args) -> tuple[set[int], set[int]]:
    """(server CPUs, client CPUs); empty sets = no pinning."""
    if args.no_pin or not hasattr(os, "sched_setaffinity"):
        return set(), set()
    avail = sorted(os.sched_getaffinity(0))
    if args.server_cpus or args.client_cpus:
        server = parse_cpus(args.server_cpus) if args.server_cpus else set(avail) - parse_cpus(args.client_cpus)
        client = parse_cpus(args.client_cpus) if args.client_cpus else set(avail) - server
    elif len(avail) >= 2:
        server, client = set(avail[:-1]), {avail[-1]}
    else:
        return set(), set()
    bad = (server | client) - set(avail)
    if not server or not client or bad or server & client:
        raise SystemExit(f"bad CPU split: server {sorted(server)}, client {sorted(client)} "
                         f"(this process may use {avail}; the two sets must be disjoint and non-empty)")
    return server, client


def one_image(export_dir, keep_ratio):
    """(manifest, variant, served model name, head output) of one seeded random image: what
    every request of the load carries (the tail's cost does not depend on the pixels)."""
    manifest = load_manifest(export_dir)
    v = variant(manifest, keep_ratio)
    size = manifest["preprocess"]["size"]
    images = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    out = Head(export_dir, v["keep_ratio"], manifest=manifest)(images)
    return manifest, v, model_name(v["keep_tokens"]), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--keep-ratio", type=float, default=None)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=400, help="single-image requests per client count")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (bare and server)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per bare-ORT measurement")
    ap.add_argument("--server-cpus", default=None, help="e.g. 0 or 0-2: server and bare ORT (default: all but the last)")
    ap.add_argument("--client-cpus", default=None, help="load generator CPUs (default: the last)")
    ap.add_argument("--no-pin", action="store_true", help="no CPU pinning: everything shares every CPU")
    ap.add_argument("--engine", default="standalone", choices=["standalone", "ray"],
                    help="ray: standalone vs Ray Serve 1 and 2 replicas, paired (benchmarks/serve_load_ray.py)")
    ap.add_argument("--rounds", type=int, default=3, help="[ray] paired rounds")
    ap.add_argument("--max-other-cores", type=float, default=0.25,
                    help="[ray] repeat a run during which other jobs on the machine took more cores than this")
    ap.add_argument("--retries", type=int, default=3, help="[ray] at most this many repeats of a disturbed run")
    ap.add_argument("--max-ongoing", type=int, default=None,
                    help="[ray] max_ongoing_requests per replica (default: the engine's, ray_config.max_ongoing)")
    ap.add_argument("--json", default=None, help="write the results as JSON: [ray] the rounds and ratios; "
                    "[standalone] both tables (benchmarks/tables.py `rows`, key=tables.N)")
    args = ap.parse_args()
    if args.engine == "ray":
        from serve_load_ray import main as ray_main

        return ray_main(args)
    server_cpus, client_cpus = pinning(args)
    if server_cpus and not args.threads:
        args.threads = len(server_cpus)                                 # same ORT threads on both sides
    pin = (lambda cpus: os.sched_setaffinity(0, cpus) if cpus else None)  # noqa: E731  this thread only

    manifest, v, model, out = one_image(args.export_dir, args.keep_ratio)
    tokens, indices = out["tokens"], out["indices"]                    # (1, P+K, D), (1, K)
    clients = [int(c) for c in args.clients.split(",")]
    mb = args.max_batch
    print(f"export {args.export_dir}: {manifest['timm_model']} {manifest.get('overrides') or ''}, "
          f"{model} (K={v['keep_tokens']}, D={manifest['dim']}), max batch {mb}, "
          f"max delay {args.max_delay_ms:g} ms, ORT threads {args.threads or 'default'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          + (f"server + bare ORT on CPUs {sorted(server_cpus)}, load generator on CPUs {sorted(client_cpus)}"
             if server_cpus else "no CPU pinning"))

    # bare ORT is measured right before and right after each server run (the mean is the
    # reference), so that drifting load on a shared machine hits both sides alike
    pin(server_cpus)                                                    # ORT's pool threads inherit it
    tail = Tail(args.export_dir, v["keep_ratio"], provider="cpu", threads=args.threads, manifest=manifest)

    def bare(b):
        pin(server_cpus)
        try:
            return bare_ort(tail, tokens, indices, b, args.seconds)
        finally:
            pin(client_cpus)

    extra = ["--threads", str(args.threads)] if args.threads else []
    proc, url = spawn(args.export_dir, "--provider", "cpu", "--max-batch", str(mb), "--max-delay-ms",
                      str(args.max_delay_ms), "--keep-ratio", str(v["keep_ratio"]), *extra,
                      cpus=server_cpus or None)
    pin(client_cpus)
    try:
        params = {"model_id": manifest["model_id"]}
        body, hlen = build_request({"tokens": tokens, "indices": indices}, params)
        single = []
        print("\n| clients (1 image/request) | requests | errors | images/s | bare ORT images/s (batch; before/after) "
              "| ratio | p50 ms | p99 ms | p99/p50 | mean server batch | CPU ms/image server / bare |\n"
              "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
        for c in clients:
            b = min(c, mb)
            before = bare(b)
            r = load(url, model, body, hlen, c, args.requests, proc.pid)
            after = bare(b)
            ref, ref_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            cells = [c, r['requests'], r['errors'], f"{r['req_s']:.1f}", f"{ref:.1f} ({b}; {before[0]:.1f}/{after[0]:.1f})",
                     f"{r['req_s'] / ref:.2f}x", f"{r['p50']:.2f}", f"{r['p99']:.2f}", f"{r['p99'] / r['p50']:.2f}",
                     f"{r['mean_batch']:.2f}", f"{r['cpu_ms']:.2f} / {ref_cpu:.2f}"]
            single.append(cells)
            print("| " + " | ".join(map(str, cells)) + " |")
        body, hlen = build_request({"tokens": np.repeat(tokens, mb, 0), "indices": np.repeat(indices, mb, 0)}, params)
        before = bare(mb)
        r = load(url, model, body, hlen, 1, max(20, args.requests // mb), proc.pid)
        after = bare(mb)
        ref, ref_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        print(f"\n| 1 client, {mb} images/request | requests | images/s | bare ORT batch {mb} (before/after) | ratio "
              f"| p50 ms | p99 ms | CPU ms/image server / bare |\n|---|---:|---:|---|---:|---:|---:|---|\n"
              f"| | {r['requests']} | {r['req_s'] * mb:.1f} | {ref:.1f} ({before[0]:.1f}/{after[0]:.1f}) "
              f"| {r['req_s'] * mb / ref:.2f}x | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu_ms']:.2f} / {ref_cpu:.2f} |")
        batched = [f"1 client, {mb} images/request", r['requests'], f"{r['req_s'] * mb:.1f}",
                   f"{ref:.1f} ({before[0]:.1f}/{after[0]:.1f})", f"{r['req_s'] * mb / ref:.2f}x", f"{r['p50']:.2f}",
                   f"{r['p99']:.2f}", f"{r['cpu_ms']:.2f} / {ref_cpu:.2f}"]
    finally:
        proc.terminate()
        proc.wait(15)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if args.json:   # rendered into docs/results/runtime.md by benchmarks/tables.py (`rows`, key=tables.N)
        Path(args.json).write_text(json.dumps({
            "export": {"timm_model": manifest["timm_model"], "overrides": manifest.get("overrides"),
                       "keep_tokens": v["keep_tokens"], "model_id": manifest["model_id"]},
            "max_batch": mb, "max_delay_ms": args.max_delay_ms, "threads": args.threads, "cpus": os.cpu_count(),
            "server_cpus": sorted(server_cpus or []), "client_cpus": sorted(client_cpus or []),
            "load_average_end": round(os.getloadavg()[0], 1),
            "tables": [{"columns": ["clients (1 image/request)", "requests", "errors", "images/s",
                                    "bare ORT images/s (batch; before/after)", "ratio", "p50 ms", "p99 ms", "p99/p50",
                                    "mean server batch", "CPU ms/image server / bare"], "rows": single},
                       {"columns": ["requests", "n", "images/s", f"bare ORT batch {mb} (before/after)", "ratio",
                                    "p50 ms", "p99 ms", "CPU ms/image server / bare"], "rows": [batched]}]},
            indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
