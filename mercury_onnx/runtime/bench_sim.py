"""bench, part 2: the request simulation. Each strategy's requests over a trace, and the
adaptive planner deciding per request with only what the device has seen.

For each trace, requests arrive in streams (S streams of M requests, one every
`interval_ms`, each stream starting at a random point of the trace). Every request of every
strategy gets the same start time and the same RTT sample (drawn from the trace's ping file):

    latency = device compute + transmission(payload, starting when the device is done)
              + RTT + cloud compute                         (device compute alone: mobile-only)

Transmission integrates the trace's bandwidth curve (network.Trace.transmit_s). Requests are
independent: no queueing on the device or the link between them (stated, not modelled).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .network import Trace
from .planner import Candidate, Planner, keep_ahead, proxy_accuracy
from .profiles import DeviceProfile

# an Outcome's per-request arrays; an answer from another path takes all but the energy from it
FIELDS = ("latency_ms", "device_ms", "tx_ms", "rtt_ms", "cloud_ms", "payload", "energy_mj", "accuracy")
ANSWER_FIELDS = tuple(f for f in FIELDS if f != "energy_mj")

PROBE_BYTES = 16_000
PROBE_TIMEOUT_S = 1.0          # a probe is abandoned (radio off) after this long


@dataclass
class Strategy:
    method: str
    keep_ratio: float | None
    token_dtype: str | None
    device_ms: float
    payload: np.ndarray            # (P,) bytes per image (cycled over requests); [0] for none
    cloud_ms: float
    top1: float | None
    measured: list[str] = field(default_factory=list)
    notes: str = ""

    @property
    def label(self) -> str:
        if self.keep_ratio is None:
            return self.method
        return f"{self.method} r={self.keep_ratio:.3g} {self.token_dtype}"

    @property
    def offloads(self) -> bool:
        return bool(self.payload.max() > 0)


@dataclass
class Requests:
    start_s: np.ndarray            # (S, M) request start times on the trace
    rtt_ms: np.ndarray             # (S, M)
    image: np.ndarray              # (S, M) which image (for per-image payloads)
    stream_start_s: np.ndarray     # (S,) when each stream's first bandwidth probe goes out


def make_requests(trace: Trace, n: int, rng: np.random.Generator, interval_ms: float = 500.0,
                  per_stream: int = 50) -> Requests:
    m = max(1, min(per_stream, n))
    s = max(1, int(np.ceil(n / m)))
    t0 = trace.sample_starts(s, rng)                                   # (S,)
    starts = t0[:, None] + interval_ms / 1e3 * np.arange(1, m + 1)[None]
    return Requests(starts, trace.sample_rtt_ms(s * m, rng).reshape(s, m),
                    rng.integers(0, 1 << 30, size=(s, m)), t0)


@dataclass
class Outcome:
    latency_ms: np.ndarray         # (S, M)
    device_ms: np.ndarray
    tx_ms: np.ndarray
    rtt_ms: np.ndarray
    cloud_ms: np.ndarray
    payload: np.ndarray
    energy_mj: np.ndarray
    accuracy: np.ndarray
    fallback_rate: float = 0.0     # planner only: share of requests the local hedge answered
    race_rate: float = 0.0         # planner only: share of requests a local run's upload alongside answered
    ahead_sent_rate: float = 0.0   # planner only: share of requests with the JPEG sent ahead of a head
    ahead_rate: float = 0.0        # planner only: share of requests that JPEG answered


def run_fixed(st: Strategy, trace: Trace, req: Requests, device: DeviceProfile) -> Outcome:
    shape = req.start_s.shape
    payload = st.payload[req.image % len(st.payload)] if st.offloads else np.zeros(shape)
    dev = np.full(shape, st.device_ms)
    if st.offloads:
        tx = trace.transmit_s(payload, req.start_s + st.device_ms / 1e3) * 1e3
        rtt, cloud = req.rtt_ms.copy(), np.full(shape, st.cloud_ms)
    else:
        tx, rtt, cloud = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    lat = dev + tx + rtt + cloud
    energy = device.energy_mj(dev, tx, payload, rtt + cloud)
    acc = np.full(shape, np.nan if st.top1 is None else st.top1)
    return Outcome(lat, dev, tx, rtt, cloud, payload, energy, acc)


def send(trace: Trace, planner: Planner, start_s: float, nbytes: float, abandon_s: float) -> tuple[float, float, bool]:
    """A transfer the planner learns from, given up after `abandon_s` (radio off). Records what
    the device sees: (start, end, bytes) when it completes, else (start, start + abandon_s,
    bytes sent by then). Returns (seconds the radio was on, bytes sent, completed?)."""
    tx = float(trace.transmit_s(nbytes, start_s))
    if tx <= abandon_s:
        planner.observe_transfer(start_s, start_s + tx, nbytes)
        return tx, nbytes, True
    sent = float(trace.bytes_until(start_s + abandon_s) - trace.bytes_until(start_s))
    planner.observe_transfer(start_s, start_s + abandon_s, sent)
    return abandon_s, sent, False


def run_planner(strategies: list[Strategy], outcomes: list[Outcome], trace: Trace, req: Requests,
                device: DeviceProfile, slo_ms: float | None, window: int = 10,
                hedge_factor: float = 2.0) -> tuple[Outcome, np.ndarray]:
    """mercury-adaptive over the same requests. Returns its outcome and the chosen index
    (into `strategies`) per request. The planner sees only what the device saw before each
    request starts (its transfers, their RTTs). Both ways of running race the other path:

    - an upload that has not answered by the planner's timeout starts the full model on the
      device (the CPU is idle while it waits); the first answer wins, so a hedged request is
      never slower than the upload alone, and the local run's energy is counted for as long
      as it ran (the client's fallback="local");
    - a local run sends the request's own upload alongside (Decision.race, the JPEG): it keeps
      the bandwidth estimate fresh, and when it answers first the local run stops. The upload
      is given up when the local run answers or after PROBE_TIMEOUT_S, whichever is later; its
      radio energy is counted. Without such a candidate a PROBE_BYTES probe is sent instead;
    - an upload with the JPEG sent ahead (Decision.ahead, `upload_ahead`): the JPEG goes while
      the head runs, and the head's payload only if the JPEG will not answer first.

    Before a stream's first request the device sends one PROBE_BYTES probe."""
    allowed = [i for i, st in enumerate(strategies) if st.method in ("mobile-only", "cloud-only-jpeg", "mercury")]
    local = next((i for i in allowed if strategies[i].method == "mobile-only"), None)
    cands = [Candidate(strategies[i].label, strategies[i].method, strategies[i].device_ms,
                       float(strategies[i].payload.mean()), strategies[i].cloud_ms,
                       strategies[i].top1 if strategies[i].top1 is not None else
                       proxy_accuracy(strategies[i].method, strategies[i].keep_ratio, strategies[i].token_dtype))
             for i in allowed]
    S, M = req.start_s.shape
    choice = np.zeros((S, M), dtype=np.int64)
    out = {f: np.zeros((S, M)) for f in FIELDS}
    fallbacks = races_won = ahead_sent = ahead_won = 0
    radio_w, j_per_byte_mj = device.radio_base_w, device.radio_j_per_byte * 1e3
    for s in range(S):
        p = Planner(cands, slo_ms, window, hedge_factor=hedge_factor)
        t = req.stream_start_s[s]                        # initial probe before the first request
        on_s, _, ok = send(trace, p, t, PROBE_BYTES, PROBE_TIMEOUT_S)
        if ok:
            p.observe_rtt(t + on_s + req.rtt_ms[s, -1] / 1e3, req.rtt_ms[s, -1])
        for j in range(M):
            now = req.start_s[s, j]
            d = p.choose(now)
            i = allowed[d.index]
            choice[s, j] = i
            o = outcomes[i]
            for f in FIELDS:
                out[f][s, j] = getattr(o, f)[s, j]
            if strategies[i].offloads:
                if d.ahead is None:
                    start = now + o.device_ms[s, j] / 1e3
                    p.observe_transfer(start, start + o.tx_ms[s, j] / 1e3, o.payload[s, j])
                    p.observe_rtt(now + o.latency_ms[s, j] / 1e3, o.rtt_ms[s, j])
                else:
                    ahead_sent += 1
                    ahead_won += upload_ahead(out, s, j, now, outcomes[allowed[d.ahead]], o, cands[d.ahead],
                                              cands[d.index], trace, p, device)
                lat = out["latency_ms"][s, j]
                if local is None or lat <= d.timeout_ms:
                    continue
                loc = strategies[local].device_ms        # late: start the full model here too
                done = min(lat, d.timeout_ms + loc)
                out["latency_ms"][s, j] = done
                out["energy_mj"][s, j] += (device.active_w - device.idle_w) * (done - d.timeout_ms)
                if done < lat:                            # the local run answered first
                    fallbacks += 1
                    out["tx_ms"][s, j] = d.timeout_ms - out["device_ms"][s, j]
                    out["device_ms"][s, j] += loc
                    out["rtt_ms"][s, j] = out["cloud_ms"][s, j] = 0.0
                    out["accuracy"][s, j] = outcomes[local].accuracy[s, j]
                continue
            loc = o.latency_ms[s, j]                     # a local run, with an upload alongside
            if d.race is None:
                on_s, sent, ok = send(trace, p, now, PROBE_BYTES, PROBE_TIMEOUT_S)
                if ok:
                    p.observe_rtt(now + on_s + req.rtt_ms[s, j] / 1e3, req.rtt_ms[s, j])
                out["energy_mj"][s, j] += radio_w * on_s * 1e3 + j_per_byte_mj * sent
                out["payload"][s, j] = sent
                continue
            k = allowed[d.race]
            r = outcomes[k]
            start = now + r.device_ms[s, j] / 1e3
            on_s, sent, ok = send(trace, p, start, r.payload[s, j], max(PROBE_TIMEOUT_S, loc / 1e3))
            if ok:
                p.observe_rtt(now + r.latency_ms[s, j] / 1e3, r.rtt_ms[s, j])
            won = ok and r.latency_ms[s, j] < loc
            lat = r.latency_ms[s, j] if won else loc
            # the CPU is busy until the first answer; the radio is on while the upload runs
            out["energy_mj"][s, j] = device.active_w * lat + radio_w * on_s * 1e3 + j_per_byte_mj * sent
            out["payload"][s, j] = sent
            if won:
                races_won += 1
                for f in ANSWER_FIELDS:
                    out[f][s, j] = getattr(r, f)[s, j]
    return Outcome(**{f: out[f] for f in FIELDS}, fallback_rate=fallbacks / choice.size,
                   race_rate=races_won / choice.size, ahead_sent_rate=ahead_sent / choice.size,
                   ahead_rate=ahead_won / choice.size), choice


def upload_ahead(out: dict, s: int, j: int, now: float, ob: Outcome, oa: Outcome, cb: Candidate, ca: Candidate,
                 trace: Trace, p: Planner, device: DeviceProfile) -> bool:
    """Request (s, j) as Decision.ahead runs it: the JPEG (outcome ob) is encoded and sent while
    the head of the chosen upload (outcome oa) runs; when the head is done, the JPEG goes on if
    it has finished or `keep_ahead` says it will answer first, else it is stopped and the head's
    payload is sent. Writes the request's row of `out`; True when the JPEG answered."""
    enc, head = ob.device_ms[s, j], oa.device_ms[s, j]
    t0 = now + enc / 1e3                              # the JPEG starts (ob's transfer starts here too)
    th = t0 + head / 1e3                              # the head is done
    tx_b, pb = ob.tx_ms[s, j] / 1e3, ob.payload[s, j]
    sent = pb if t0 + tx_b <= th else float(trace.bytes_until(th) - trace.bytes_until(t0))
    keep = sent >= pb or keep_ahead(pb - sent, sent / (th - t0), cb, ca, oa.payload[s, j])
    a_w, i_w, r_w, jb = device.active_w, device.idle_w, device.radio_base_w, device.radio_j_per_byte * 1e3
    if keep:                                          # the JPEG answers; the head ran alongside for nothing
        lat = ob.latency_ms[s, j]
        p.observe_transfer(t0, t0 + tx_b, pb)
        p.observe_rtt(now + lat / 1e3, ob.rtt_ms[s, j])
        for f in ANSWER_FIELDS:
            out[f][s, j] = getattr(ob, f)[s, j]
        out["energy_mj"][s, j] = ob.energy_mj[s, j] + (a_w - i_w) * min(head, lat - enc)
        return True
    p.observe_transfer(t0, th, sent)                  # stopped: what it moved is a link sample too
    tx_a = float(trace.transmit_s(oa.payload[s, j], th))
    p.observe_transfer(th, th + tx_a, oa.payload[s, j])
    rtt = oa.rtt_ms[s, j]
    lat = enc + head + tx_a * 1e3 + rtt + oa.cloud_ms[s, j]
    p.observe_rtt(now + lat / 1e3, rtt)
    row = {"latency_ms": lat, "device_ms": enc + head, "tx_ms": tx_a * 1e3, "rtt_ms": rtt,
           "cloud_ms": oa.cloud_ms[s, j], "payload": sent + oa.payload[s, j], "accuracy": oa.accuracy[s, j],
           "energy_mj": a_w * (enc + head) + i_w * (lat - enc - head) + r_w * (th - t0 + tx_a) * 1e3
           + jb * (sent + oa.payload[s, j])}
    for f, v in row.items():
        out[f][s, j] = v
    return False
