"""mercury-adaptive: per request, pick the strategy that fits the current uplink.

Candidates are fixed strategies (mobile-only, cloud-only-jpeg, Mercury at each keep ratio and
token dtype), each known by its device compute, payload bytes, cloud compute and accuracy.

What the device knows at a request's start: the rates (bytes / s) of its own recent transfers
(the last `window`: Janus uses 10, the bench 30, which sees how often a bursty link stalls; a transfer still in flight that is already slower than the
typical rate counts as bytes / elapsed-so-far, an upper bound on its rate, so an outage shows
before the stuck transfer completes) and the last 100 RTTs it measured. Nothing later.

The planner optimises the metric the bench reports. The next transfer's rate and RTT are
taken to be one of the recent rates r_1..r_n and one of the recent RTTs t_1..t_m, all pairs
equally likely (their empirical distributions), and an upload is hedged: if it has not
answered after `timeout`, the device starts the full model (`hedge_factor` x the upload's
latency at the median recent rate and RTT; with an SLO the local run meets, at the latest
SLO - local, so that it still does). So an upload's latency is

    U(r, t)  = device + payload / r + t + cloud
    E[lat]   = mean_ij min(U(r_i, t_j), timeout + local)        (a local run: local, known)
    P[miss]  = mean_ij [min(U(r_i, t_j), timeout + local) > SLO]

(Without the cap, E over r of payload / r is payload / harmonic mean of the r_i: Janus'
estimate; the cap is what the hedge buys.)

    without an SLO: the candidate with the lowest E[lat]
    with an SLO:    the highest accuracy x (1 - P[miss]), the chance of a correct answer in
                    time (a late answer counts as a wrong one); ties: one whose compute alone
                    fits the SLO (a local run slower than the SLO never makes it, an upload
                    might, even when every recent sample says it will not), then the lowest
                    P[miss], then the lowest E[lat]

When the device runs the full model locally, it still sends one transfer to measure the link:
the request's own upload (the fastest candidate at least as accurate as the local run, i.e.
the JPEG), so a link that turns out to be good answers first and the local run stops
(`Decision.race`). Accuracy is the candidate's top-1 when an eval JSON gives it; otherwise a
proxy that only orders them: 1.0 for the full model, the keep ratio for Mercury, minus
0.001 for int8 tokens. numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_RATE_BPS = 1.0          # a transfer that moved nothing: 1 B/s, not a division by zero


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


@dataclass
class Decision:
    index: int                       # the chosen candidate
    expected_ms: float               # its expected latency (E[lat] above)
    timeout_ms: float                # an upload not answered by then starts the local run (inf: never)
    race: int | None = None          # local run: the upload sent alongside it (None: none)


def upload_ms(c: Candidate, rate_Bps, rtt_ms):
    """U(r, t) above: device + payload / r + t + cloud (numpy broadcasts r and t)."""
    return c.device_ms + c.payload_bytes / rate_Bps * 1e3 + rtt_ms + c.cloud_ms


def proxy_accuracy(method: str, keep_ratio: float | None, token_dtype: str | None) -> float:
    if keep_ratio is None:
        return 1.0
    return keep_ratio - (0.001 if token_dtype == "int8" else 0.0)


class Planner:
    def __init__(self, candidates: list[Candidate], slo_ms: float | None = None, window: int = 10,
                 rtt_window: int = 100, hedge_factor: float = 2.0):
        if not candidates:
            raise ValueError("the planner needs at least one candidate")
        self.candidates, self.slo_ms, self.window, self.rtt_window = candidates, slo_ms, window, rtt_window
        self.hedge_factor = hedge_factor
        local = [i for i, c in enumerate(candidates) if not c.offloads]
        self.local = min(local, key=lambda i: candidates[i].device_ms) if local else None
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

    def rates_Bps(self, now_s: float) -> np.ndarray | None:
        """Rates (bytes/s) of the last n transfers finished by now, plus those still running
        that are already slower than the median of the finished ones (bytes / elapsed)."""
        done = [n / max(e - s, 1e-9) for s, e, n in self.transfers if e <= now_s][-self.window:]
        if not done:
            return None
        med = float(np.median(done))
        slow = [n / max(now_s - s, 1e-9) for s, e, n in self.transfers if s < now_s < e]
        rates = (done + [r for r in slow if r < med])[-self.window:]
        return np.maximum(np.array(rates), MIN_RATE_BPS)

    def bandwidth_Bps(self, now_s: float) -> float | None:
        """Harmonic mean of the recent rates (the Janus estimate; E[bytes / r] = bytes / this)."""
        r = self.rates_Bps(now_s)
        return None if r is None else float(r.size / np.sum(1.0 / r))

    def rtts_ms(self, now_s: float) -> np.ndarray:
        """The last `rtt_window` RTTs known by now ([0] before the first)."""
        known = [r for t, r in self.rtts if t <= now_s][-self.rtt_window:]
        return np.array(known or [0.0])

    # --- the decision ------------------------------------------------------------
    def outcomes_ms(self, c: Candidate, rates: np.ndarray | None, rtts: np.ndarray) -> tuple[np.ndarray, float]:
        """(possible latencies of candidate c, one per recent rate x recent RTT, hedge
        included; its timeout in ms)."""
        if not c.offloads:
            return np.array([c.device_ms]), float("inf")
        if rates is None:                            # never seen the link: no basis to upload
            return np.array([float("inf")]), float("inf")
        upload = upload_ms(c, rates[:, None], rtts[None, :]).ravel()
        if self.local is None:
            return upload, float("inf")
        local_ms = self.candidates[self.local].device_ms
        timeout = self.hedge_factor * upload_ms(c, float(np.median(rates)), float(np.median(rtts)))
        if self.slo_ms is not None and local_ms <= self.slo_ms:     # late enough to still make the SLO
            timeout = min(timeout, self.slo_ms - local_ms)
        return np.minimum(upload, timeout + local_ms), timeout

    def choose(self, now_s: float) -> Decision:
        rates, rtt = self.rates_Bps(now_s), self.rtts_ms(now_s)
        cs = self.candidates
        outs = [self.outcomes_ms(c, rates, rtt) for c in cs]
        expected = [float(o.mean()) for o, _ in outs]
        if self.slo_ms is None:
            best = min(range(len(cs)), key=lambda i: (expected[i], cs[i].offloads))
        else:   # the chance of a correct answer in time; ties: one that can make it, fewer misses, faster
            miss = [float((o > self.slo_ms).mean()) for o, _ in outs]
            can = [c.device_ms + c.cloud_ms <= self.slo_ms for c in cs]
            best = max(range(len(cs)), key=lambda i: (cs[i].accuracy * (1 - miss[i]), can[i], -miss[i], -expected[i]))
        race = None
        if not cs[best].offloads:                   # measure the link with this request's own upload
            ups = [i for i, c in enumerate(cs) if c.offloads and c.accuracy >= cs[best].accuracy - 1e-12]
            race = min(ups, key=lambda i: expected[i]) if ups else None
        return Decision(best, expected[best], outs[best][1], race)
