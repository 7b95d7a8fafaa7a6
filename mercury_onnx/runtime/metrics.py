"""serve-tail's Prometheus metrics, kept in process and rendered as text for GET /metrics.

    metrics = Metrics(max_batch=16)
    metrics.request("mercury_tail_k16", 200, 0.004)        # every infer request: status, seconds
    metrics.error("mercury_tail_k16", "bad_request")       # refusals by reason (protocol.REASONS)
    metrics.batch_run("mercury_tail_k16", 8, 0.030)        # every tail run: images, seconds
    text = metrics.render({"mercury_tail_k16": 3})          # with the in-flight gauge
    total.add(metrics.state())                              # counts kept in another process, summed

Series: mercury_requests_in_flight, mercury_requests_total{model,status},
mercury_errors_total{model,reason}, and the histograms mercury_request_latency_seconds,
mercury_batch_size, mercury_tail_seconds (per model). Framework-free: any engine can serve it;
state()/add() carry the counts of several processes (Ray's tail replicas) into one /metrics.
"""
from __future__ import annotations


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = list(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def add(self, counts: list[int], total: float, count: int) -> None:
        self.counts = [a + b for a, b in zip(self.counts, counts)]
        self.sum, self.count = self.sum + total, self.count + count

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        lines = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}',
                  f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.count}"]
        return lines


class Metrics:
    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self, max_batch: int):
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch: dict[str, Histogram] = {}
        self.tail: dict[str, Histogram] = {}
        self.batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})

    def request(self, model: str, status: int, seconds: float) -> None:
        self.requests[model, status] = self.requests.get((model, status), 0) + 1
        self.latency.setdefault(model, Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def error(self, model: str, reason: str) -> None:
        self.errors[model, reason] = self.errors.get((model, reason), 0) + 1

    def batch_run(self, model: str, size: int, seconds: float) -> None:
        self.batch.setdefault(model, Histogram(self.batch_buckets)).observe(size)
        self.tail.setdefault(model, Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def state(self) -> dict:
        """Every count, as plain data (picklable, comparable): what add() takes."""
        hist = lambda hs: {m: (list(h.counts), h.sum, h.count) for m, h in hs.items()}   # noqa: E731
        return {"requests": dict(self.requests), "errors": dict(self.errors), "latency": hist(self.latency),
                "batch": hist(self.batch), "tail": hist(self.tail)}

    def add(self, state: dict) -> None:
        """Sum another Metrics' state() (same max_batch) into this one."""
        for key, n in state["requests"].items():
            self.requests[key] = self.requests.get(key, 0) + n
        for key, n in state["errors"].items():
            self.errors[key] = self.errors.get(key, 0) + n
        for name, buckets in (("latency", self.LATENCY_BUCKETS), ("batch", self.batch_buckets),
                              ("tail", self.LATENCY_BUCKETS)):
            mine = getattr(self, name)
            for m, h in state[name].items():
                mine.setdefault(m, Histogram(buckets)).add(*h)

    def render(self, in_flight: dict[str, int] | None = None) -> str:
        out = ["# HELP mercury_requests_in_flight Inference requests being handled now.",
               "# TYPE mercury_requests_in_flight gauge"]
        out += [f'mercury_requests_in_flight{{model="{m}"}} {n}' for m, n in sorted((in_flight or {}).items())]
        out += ["# HELP mercury_requests_total Inference requests by model and HTTP status.",
               "# TYPE mercury_requests_total counter"]
        out += [f'mercury_requests_total{{model="{m}",status="{s}"}} {n}' for (m, s), n in sorted(self.requests.items())]
        out += ["# HELP mercury_errors_total Failed inference requests by reason.",
                "# TYPE mercury_errors_total counter"]
        out += [f'mercury_errors_total{{model="{m}",reason="{r}"}} {n}' for (m, r), n in sorted(self.errors.items())]
        for name, help_, hists in (
                ("mercury_request_latency_seconds", "Request latency inside the server.", self.latency),
                ("mercury_batch_size", "Images per tail run (dynamic batching).", self.batch),
                ("mercury_tail_seconds", "Tail compute time per batch.", self.tail)):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
            for m, h in sorted(hists.items()):
                out += h.render(name, f'model="{m}"')
        return "\n".join(out) + "\n"
