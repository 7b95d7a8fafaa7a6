"""mercury-adaptive: per request, pick the strategy that fits the current uplink.

Candidates are fixed strategies (mobile-only, cloud-only-jpeg, Mercury at each keep ratio and
token dtype), each known by its device compute, payload bytes, cloud compute and accuracy.
The bandwidth estimate is the harmonic mean of the throughput of the last n transfers, as in
Janus (Liang et al., INFOCOM 2023); the RTT estimate is the mean of the last 100 RTTs (RTT
noise is not predictable from a few samples, so a short window only adds noise). A
transfer still in flight counts as bytes / elapsed-so-far (an upper bound on its rate), so
an outage pulls the estimate down before the stuck transfer completes.

    predicted latency = device + payload / bandwidth + RTT + cloud      (device alone for mobile-only)
    with an SLO:  the most accurate candidate predicted to meet it, uploads with the margin
                  below (ties: a local run, then the fastest);
                  if none is predicted to meet it, the fastest of those whose compute alone
                  fits (a local run slower than the SLO can never meet it; an upload might)
    without:      the fastest, where an upload must beat a local run by `margin` (10%): the
                  estimate is noisy and a local run's time is known

Accuracy is the candidate's top-1 when an eval JSON gives it; otherwise a proxy that only
orders them: 1.0 for the full model, the keep ratio for Mercury, minus 0.001 for int8 tokens.
numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Candidate:
    label: str                       # e.g. "mercury r=0.25 int8"
    method: str                      # mobile-only | cloud-only-jpeg | mercury | ...
    device_ms: float
    payload_bytes: float             # mean bytes sent (0 for mobile-only)
    cloud_ms: float
    accuracy: float                  # top-1, or the proxy above

    @property
    def offloads(self) -> bool:
        return self.payload_bytes > 0


def proxy_accuracy(method: str, keep_ratio: float | None, token_dtype: str | None) -> float:
    if keep_ratio is None:
        return 1.0
    return keep_ratio - (0.001 if token_dtype == "int8" else 0.0)


class Planner:
    def __init__(self, candidates: list[Candidate], slo_ms: float | None = None, window: int = 5,
                 rtt_window: int = 100, margin: float = 0.1):
        if not candidates:
            raise ValueError("the planner needs at least one candidate")
        self.candidates, self.slo_ms, self.window, self.rtt_window = candidates, slo_ms, window, rtt_window
        self.margin = margin
        self.transfers: list[tuple[float, float, float]] = []      # (start s, end s, bytes)
        self.rtts: list[tuple[float, float]] = []                 # (time known s, ms)

    # --- what the device has seen ---------------------------------------------
    def observe_transfer(self, start_s: float, end_s: float, nbytes: float) -> None:
        self.transfers.append((start_s, end_s, nbytes))
        if len(self.transfers) > 4 * self.window:
            self.transfers = self.transfers[-4 * self.window:]

    def observe_rtt(self, at_s: float, rtt_ms: float) -> None:
        self.rtts.append((at_s, rtt_ms))
        if len(self.rtts) > 2 * self.rtt_window:
            self.rtts = self.rtts[-2 * self.rtt_window:]

    def bandwidth_Bps(self, now_s: float) -> float | None:
        """Harmonic mean of the rates (bytes/s) of the last n transfers finished by now; a
        transfer still running counts as bytes / (now - start) once that is below the estimate."""
        done = [n / max(e - s, 1e-9) for s, e, n in self.transfers if e <= now_s][-self.window:]
        if not done:
            return None
        hm = len(done) / sum(1.0 / max(r, 1e-9) for r in done)
        # transfers still running: evidence only when they are already slower than the estimate
        slow = [n / max(now_s - s, 1e-9) for s, e, n in self.transfers if s < now_s < e]
        slow = [r for r in slow if r < hm]
        if not slow:
            return hm
        rates = (done + slow)[-self.window:]
        return len(rates) / sum(1.0 / max(r, 1e-9) for r in rates)

    def rtt_ms(self, now_s: float) -> float:
        known = [r for t, r in self.rtts if t <= now_s][-self.rtt_window:]
        return sum(known) / len(known) if known else 0.0

    # --- the decision ------------------------------------------------------------
    def predict_ms(self, c: Candidate, bw_Bps: float | None, rtt_ms: float) -> float:
        if not c.offloads:
            return c.device_ms
        if bw_Bps is None or bw_Bps <= 0:
            return float("inf")
        return c.device_ms + c.payload_bytes / bw_Bps * 1e3 + rtt_ms + c.cloud_ms

    def choose(self, now_s: float) -> tuple[int, float]:
        """(index of the chosen candidate, its predicted latency in ms)."""
        bw, rtt = self.bandwidth_Bps(now_s), self.rtt_ms(now_s)
        pred = [self.predict_ms(c, bw, rtt) for c in self.candidates]
        # an upload is a gamble on the estimate, a local run is not: uploads must win by a margin
        risk = [p * (1 + self.margin) if c.offloads else p for p, c in zip(pred, self.candidates)]
        fastest = min(range(len(pred)), key=lambda i: risk[i])
        if self.slo_ms is None:
            return fastest, pred[fastest]
        ok = [i for i in range(len(pred)) if risk[i] <= self.slo_ms]
        if not ok:   # none predicted to make it: the fastest of those that still can
            can = [i for i, c in enumerate(self.candidates) if c.device_ms + c.cloud_ms <= self.slo_ms]
            i = min(can or range(len(pred)), key=lambda i: pred[i])
            return i, pred[i]
        # equal accuracy: a local run (no network risk) first, then the fastest
        best = max(ok, key=lambda i: (self.candidates[i].accuracy, not self.candidates[i].offloads, -pred[i]))
        return best, pred[best]
