"""mercury-adaptive: per request, pick the strategy that fits the current uplink.

Candidates are fixed strategies (mobile-only, cloud-only-jpeg, Mercury at each keep ratio and
token dtype), each known by its device compute, payload bytes, cloud compute and accuracy.

What the device knows at a request's start: its own recent transfers, each (start, end,
bytes) (the last `window`: Janus uses 10, the bench 30, which sees how often a bursty link
stalls; a transfer still in flight that is already slower than the typical rate counts as
bytes / elapsed-so-far, an upper bound on its rate, so an outage shows before the stuck
transfer completes) and the last 100 RTTs it measured. Nothing later.

The planner optimises the metric the bench reports. The next upload starts in the link state
one of the recent transfers saw and the RTT is one of the recent RTTs t_1..t_m. Its time T_i
is what the recent transfers, replayed in time order from transfer i on (wrapping around),
take to move its bytes: a payload no bigger than what transfer i moved takes payload / r_i,
a bigger one also crosses the states that came after (a JPEG that starts in a short stall
does not move all its bytes at the stall's rate). Transfers that overlap in time saw the same
link, so each counts 1 / (the window transfers it overlaps, itself included): the several
requests a device sends into one outage are one observation of it, not one each (once the
outage is over; one still running counts in full). So an upload's latency is

    U(T, t)  = device + T + t + cloud
    E[lat]   = sum_ij w_i min(U(T_i, t_j), timeout + local) / (m sum_i w_i)   (local: known)
    P[miss]  = the same weights over [min(U(T_i, t_j), timeout + local) > SLO]

and an upload is hedged: if it has not answered after `timeout`, the device starts the full
model (`hedge_factor` x the upload's latency at the median recent rate and RTT; with an SLO
the local run meets, at the latest SLO - local, so that it still does). (With equal weights and
payloads no bigger than the recent transfers, E over i of payload / r_i is payload / the
harmonic mean of the r_i: Janus' estimate; the cap is what the hedge buys.)

    without an SLO: the candidate with the lowest E[lat]
    with an SLO:    the highest accuracy x (1 - P[miss]), the chance of a correct answer in
                    time (a late answer counts as a wrong one); ties: one whose compute alone
                    fits the SLO (a local run slower than the SLO never makes it, an upload
                    might, even when every recent sample says it will not), then the lowest
                    P[miss], then the lowest E[lat]

Without an SLO an upload whose device compute is a head can have the JPEG sent ahead of it:
the JPEG is encoded and sent while the head runs (the radio is idle then), and when the head is
done the device keeps whichever will answer first (`keep_ahead`: the bytes the JPEG has left
against the head's payload, on the same link). Its latency on each sample is
min(U_jpeg, device_jpeg + U_head), so the pair's E[lat] is never above the JPEG's and is below
the head's alone when the samples disagree about which is faster; it is chosen when it beats
every candidate alone (`Decision.ahead`). Its cost is energy and bytes, not latency.

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
    ahead: int | None = None         # upload: the one sent ahead while its device compute runs (None: none)


def upload_ms(c: Candidate, rate_Bps, rtt_ms):
    """U(r, t) above: device + payload / r + t + cloud (numpy broadcasts r and t)."""
    return c.device_ms + c.payload_bytes / rate_Bps * 1e3 + rtt_ms + c.cloud_ms


def sample_rates(start: np.ndarray, end: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """Rates (bytes/s) of link samples (start s, end s, bytes moved)."""
    return np.maximum(moved / np.maximum(end - start, 1e-9), MIN_RATE_BPS)


def overlap_weights(start: np.ndarray, end: np.ndarray, now_s: float) -> np.ndarray:
    """Each link sample's weight: 1 / (the samples it overlaps in time, itself included), 1 for
    one still running at now_s (see the module docstring)."""
    overlaps = (start[:, None] < end[None, :]) & (start[None, :] < end[:, None])          # (n, n)
    return np.where(end >= now_s, 1.0, 1.0 / overlaps.sum(1))


def replay_s(nbytes: float, start: np.ndarray, end: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """T_i: seconds to move nbytes starting in link sample i (start, end, bytes moved; time
    order) and going on through the samples after it, wrapping around -> (n,)."""
    n = moved.size
    if moved.sum() <= 0:                                                # nothing got through at all
        return np.full(n, nbytes / MIN_RATE_BPS)
    secs = np.maximum(end - start, 1e-9)
    rate = np.tile(sample_rates(start, end, moved), 2)
    laps, rest = divmod(float(nbytes), float(moved.sum()))            # whole passes over the window
    if rest == 0.0 and laps > 0:
        laps, rest = laps - 1, float(moved.sum())
    cum_b = np.concatenate([[0.0], np.cumsum(np.tile(moved, 2))])     # (2n+1,): two passes
    cum_s = np.concatenate([[0.0], np.cumsum(np.tile(secs, 2))])
    target = cum_b[:n] + rest                                           # (n,) bytes to reach
    j = np.clip(np.searchsorted(cum_b, target, side="left") - 1, np.arange(n), 2 * n - 1)   # the sample it ends in
    return cum_s[j] - cum_s[:n] + (target - cum_b[j]) / rate[j] + laps * secs.sum()


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

    def link_samples(self, now_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The transfers the estimate is made of, in time order: the last n finished by now,
        plus those still running that are already slower than the median of the finished
        ones (as bytes / elapsed so far). -> (starts s, ends s (now for a running one), bytes),
        or None before the first transfer finishes."""
        done = [(s, e, n) for s, e, n in self.transfers if e <= now_s][-self.window:]
        if not done:
            return None
        med = float(np.median([n / max(e - s, 1e-9) for s, e, n in done]))
        slow = [(s, now_s, n) for s, e, n in self.transfers if s < now_s < e and n / max(now_s - s, 1e-9) < med]
        start, end, nbytes = np.array((done + slow)[-self.window:], dtype=np.float64).T
        return start, end, nbytes

    def rates_Bps(self, now_s: float) -> np.ndarray | None:
        """Rates (bytes/s) of the link samples (`link_samples`)."""
        smp = self.link_samples(now_s)
        if smp is None:
            return None
        return sample_rates(*smp)

    def sample_weights(self, now_s: float) -> np.ndarray | None:
        """The link samples' weights (`overlap_weights`)."""
        smp = self.link_samples(now_s)
        return None if smp is None else overlap_weights(smp[0], smp[1], now_s)

    def bandwidth_Bps(self, now_s: float) -> float | None:
        """Harmonic mean of the recent rates (the Janus estimate; E[bytes / r] = bytes / this)."""
        r = self.rates_Bps(now_s)
        return None if r is None else float(r.size / np.sum(1.0 / r))

    def rtts_ms(self, now_s: float) -> np.ndarray:
        """The last `rtt_window` RTTs known by now ([0] before the first)."""
        known = [r for t, r in self.rtts if t <= now_s][-self.rtt_window:]
        return np.array(known or [0.0])

    # --- the decision ------------------------------------------------------------
    def outcomes_ms(self, c: Candidate, samples, rtts: np.ndarray) -> tuple[np.ndarray, float]:
        """(possible latencies of candidate c, (n link samples, m recent RTTs) flattened,
        hedge included; its timeout in ms). samples: `link_samples` (None: none yet)."""
        if not c.offloads:
            return np.array([c.device_ms]), float("inf")
        if samples is None:                          # never seen the link: no basis to upload
            return np.array([float("inf")]), float("inf")
        tx_ms = replay_s(c.payload_bytes, *samples) * 1e3                          # (n,)
        upload = (c.device_ms + tx_ms[:, None] + rtts[None, :] + c.cloud_ms).ravel()
        if self.local is None:
            return upload, float("inf")
        local_ms = self.candidates[self.local].device_ms
        timeout = self.hedge_factor * upload_ms(c, float(np.median(sample_rates(*samples))), float(np.median(rtts)))
        if self.slo_ms is not None and local_ms <= self.slo_ms:     # late enough to still make the SLO
            timeout = min(timeout, self.slo_ms - local_ms)
        return np.minimum(upload, timeout + local_ms), timeout

    def choose(self, now_s: float) -> Decision:
        samples, rtt = self.link_samples(now_s), self.rtts_ms(now_s)
        w = np.ones(1) if samples is None else overlap_weights(samples[0], samples[1], now_s)
        cs = self.candidates
        outs = [self.outcomes_ms(c, samples, rtt) for c in cs]

        def mean(x):                                 # weighted over link samples, equal over RTTs
            return float(x[0]) if x.size == 1 else float(x.reshape(w.size, -1).mean(1) @ w / w.sum())

        expected = [mean(o) for o, _ in outs]
        if self.slo_ms is None:
            best = min(range(len(cs)), key=lambda i: (expected[i], cs[i].offloads))
        else:   # the chance of a correct answer in time; ties: one that can make it, fewer misses, faster
            miss = [mean((o > self.slo_ms).astype(np.float64)) for o, _ in outs]
            can = [c.device_ms + c.cloud_ms <= self.slo_ms for c in cs]
            best = max(range(len(cs)), key=lambda i: (cs[i].accuracy * (1 - miss[i]), can[i], -miss[i], -expected[i]))
        race = None
        if not cs[best].offloads:                   # measure the link with this request's own upload
            ups = [i for i, c in enumerate(cs) if c.offloads and c.accuracy >= cs[best].accuracy - 1e-12]
            race = min(ups, key=lambda i: expected[i]) if ups else None
        elif self.slo_ms is None and samples is not None:
            pair = self.upload_ahead(outs, mean)
            if pair is not None and pair[2] < expected[best]:
                a, b, e = pair
                return Decision(a, e, outs[a][1] + cs[b].device_ms, ahead=b)
        return Decision(best, expected[best], outs[best][1], race)

    def upload_ahead(self, outs, mean) -> tuple[int, int, float] | None:
        """The best pair (a, b, E[lat]) of an upload a (Mercury: a head first) and the JPEG b sent
        ahead while a's device compute runs, the CPU busy and the radio idle; when a's compute is
        done the device keeps whichever will answer first (`keep_ahead`). Its latency on each link
        sample is min(U_b, device_b + U_a) (the JPEG is encoded first). None without such a pair."""
        cs, best = self.candidates, None
        for b, cb in enumerate(cs):
            if cb.method != "cloud-only-jpeg":
                continue
            for a, ca in enumerate(cs):
                if ca.offloads and ca.device_ms > cb.device_ms:
                    e = mean(np.minimum(outs[b][0], cb.device_ms + outs[a][0]))
                    if best is None or e < best[2]:
                        best = (a, b, e)
        return best


def keep_ahead(remaining_bytes: float, rate_Bps: float, ahead: Candidate, chosen: Candidate,
               payload_bytes: float | None = None) -> bool:
    """Once the chosen candidate's device compute is done: keep sending the upload that went
    ahead (remaining_bytes left, moving at rate_Bps so far) rather than stop it and send the
    chosen one's payload (payload_bytes: its real size, known by then; default the candidate's
    mean)? Both would cross the same link from now on, so compare bytes, with the
    cloud-compute difference at the current rate."""
    payload = chosen.payload_bytes if payload_bytes is None else payload_bytes
    return remaining_bytes - payload <= rate_Bps * (chosen.cloud_ms - ahead.cloud_ms) / 1e3
