"""Uplink network traces: real 5G/LTE bandwidth curves, RTT samples, and transmission time.

A `Trace` is a piecewise-constant uplink rate (bytes/s over consecutive segments) that wraps
around at its end, plus RTT samples (ms). Three sources, named on the CLI:

- Ghoshal et al. 2022 (`../shared/data/traces/ghoshal2022-5g-mmwave-uplink`):
  `5g-static`, `5g-walking`, `5g-driving`, `lte-static`, `lte-walking`, `lte-driving`
  (every file and run of the scenario, concatenated), or one file of it: `5g-static/away_p1`,
  `lte-walking/lateral`. Throughput samples are Mbps at 0.1 s (the driving files'
  timestamps step by 0.1 s; the README notes the static/walking interval is undocumented).
  For the 4-line runs (driving/5g, walking/5g/lateral) the first timestamp/throughput pair is
  used; the second pair (irregular timestamps, probably MAC-layer) is ignored. Timestamp gaps
  inside a run are closed up: each sample covers 0.1 s. RTTs come from the matching
  `ping/<mobility>/<tech>/` file(s).
- mahimahi (`traces/mahimahi/*.up`): `mahimahi:TMobile-LTE-short` etc. One line per
  1500-byte delivery opportunity at that millisecond; binned to 1 ms segments over
  [0, last ms + 1). These LTE traces were recorded while driving (Winstein et al.), so their
  RTTs are sampled from the Ghoshal LTE driving ping file.
- constant: `const:20mbps` (also kbps/gbps) with a fixed RTT, `const:20mbps:30ms`
  (default 20 ms, an assumption).

Numpy only: this runs on the device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAHIMAHI_PACKET_BYTES = 1500
GHOSHAL_DIR = "ghoshal2022-5g-mmwave-uplink"
GHOSHAL_SAMPLE_S = 0.1
SCENARIOS = [f"{tech}-{mob}" for tech in ("5g", "lte") for mob in ("static", "walking", "driving")]
CONST_DEFAULT_RTT_MS = 20.0


class TraceError(ValueError):
    """A trace name or file we cannot use. The message says what exists."""


def default_traces_dir() -> Path:
    """../shared/data/traces beside the checkout (the project's data layout)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"


@dataclass
class Trace:
    name: str
    seg_s: np.ndarray        # (S,) duration of each segment, seconds
    rate_Bps: np.ndarray     # (S,) uplink rate in each segment, bytes/s
    rtt_ms: np.ndarray       # (R,) RTT samples to draw from
    source: str              # files it came from, for the report
    rtt_source: str

    def __post_init__(self):
        self.seg_s = np.asarray(self.seg_s, dtype=np.float64)
        self.rate_Bps = np.asarray(self.rate_Bps, dtype=np.float64)
        self.rtt_ms = np.asarray(self.rtt_ms, dtype=np.float64)
        if self.seg_s.shape != self.rate_Bps.shape or self.seg_s.size == 0:
            raise TraceError(f"{self.name}: empty trace or segment/rate length mismatch")
        if self.rtt_ms.size == 0:
            raise TraceError(f"{self.name}: no RTT samples")
        self.edges = np.concatenate([[0.0], np.cumsum(self.seg_s)])              # (S+1,) s
        self.cum_bytes = np.concatenate([[0.0], np.cumsum(self.seg_s * self.rate_Bps)])
        if self.cum_bytes[-1] <= 0:
            raise TraceError(f"{self.name}: the trace never delivers a byte")

    @property
    def duration_s(self) -> float:
        return float(self.edges[-1])

    @property
    def mean_mbps(self) -> float:
        return float(self.cum_bytes[-1] / self.duration_s * 8 / 1e6)

    def bytes_until(self, t: np.ndarray) -> np.ndarray:
        """Bytes deliverable in [0, t), t in seconds (may exceed the duration: wraps)."""
        t = np.asarray(t, dtype=np.float64)
        wraps, tt = np.divmod(t, self.duration_s)
        i = np.clip(np.searchsorted(self.edges, tt, side="right") - 1, 0, len(self.seg_s) - 1)
        return wraps * self.cum_bytes[-1] + self.cum_bytes[i] + (tt - self.edges[i]) * self.rate_Bps[i]

    def transmit_s(self, nbytes, t0) -> np.ndarray:
        """Seconds to push nbytes starting at time t0 (s): integrate the rate curve from t0
        until nbytes are delivered, wrapping around the trace. Vectorised over t0/nbytes."""
        nbytes = np.asarray(nbytes, dtype=np.float64)
        t0 = np.asarray(t0, dtype=np.float64)
        total = self.cum_bytes[-1]
        target = self.bytes_until(t0) + nbytes                  # cumulative bytes to reach
        wraps, rem = np.divmod(target, total)
        at_end = rem <= 0                                       # exactly at a period boundary:
        wraps = np.where(at_end, wraps - 1, wraps)              # finish at the end of the
        rem = np.where(at_end, total, rem)                      # previous period instead
        # segment i with cum[i] < rem <= cum[i+1]: its rate is > 0, zero segments are skipped
        i = np.clip(np.searchsorted(self.cum_bytes, rem, side="left") - 1, 0, len(self.seg_s) - 1)
        t_end = wraps * self.duration_s + self.edges[i] + (rem - self.cum_bytes[i]) / self.rate_Bps[i]
        return np.where(nbytes > 0, t_end - t0, 0.0)

    def sample_starts(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0.0, self.duration_s, size=n)

    def sample_rtt_ms(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self.rtt_ms, size=n, replace=True)


# ----------------------------------------------------------------------------- parsers
def read_list_runs(path: str | Path) -> list[list[np.ndarray]]:
    """A Ghoshal `.list` file: blocks of `#####`, `Run N`, then comma-separated float lines.
    Returns one list of float arrays (one per line) per run."""
    runs: list[list[np.ndarray]] = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("Run"):
            runs.append([])
            continue
        if not runs:
            raise TraceError(f"{path}: data before the first 'Run' line")
        runs[-1].append(np.array([float(v) for v in line.strip(",").split(",") if v], dtype=np.float64))
    if not runs:
        raise TraceError(f"{path}: no runs found")
    return runs


def throughput_mbps(path: str | Path) -> list[np.ndarray]:
    """Per-run throughput samples (Mbps) of a Ghoshal throughput file. One-line runs are the
    samples; four-line runs are (timestamps, throughput, timestamps, throughput): the first
    pair is used."""
    out = []
    for run in read_list_runs(path):
        if len(run) == 1:
            out.append(run[0])
        elif len(run) == 4:
            t, v = run[0], run[1]
            if len(t) != len(v):
                raise TraceError(f"{path}: timestamps ({len(t)}) and throughput ({len(v)}) differ")
            out.append(v)
        else:
            raise TraceError(f"{path}: a run with {len(run)} lines (expected 1 or 4)")
    return out


def ping_ms(path: str | Path) -> np.ndarray:
    return np.concatenate([line for run in read_list_runs(path) for line in run])


def read_mahimahi(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(seg_s, rate_Bps) in 1 ms bins from a mahimahi `.up` file."""
    ms = np.loadtxt(path, dtype=np.int64, ndmin=1)
    if ms.size == 0 or (ms < 0).any():
        raise TraceError(f"{path}: empty or negative timestamps")
    counts = np.bincount(ms, minlength=int(ms.max()) + 1)               # packets per ms
    return np.full(counts.size, 1e-3), counts * MAHIMAHI_PACKET_BYTES / 1e-3


# ----------------------------------------------------------------------------- by name
def _ghoshal(traces_dir: Path, tech: str, mobility: str, stem: str | None, name: str) -> Trace:
    root = traces_dir / GHOSHAL_DIR
    tdir, pdir = root / "throughput" / mobility / tech, root / "ping" / mobility / tech
    files = sorted(tdir.glob("*.list"))
    if stem is not None:
        files = [f for f in files if f.stem == stem]
    if not files:
        have = sorted(f.stem for f in tdir.glob("*.list"))
        raise TraceError(f"trace {name!r}: no {tdir}/{stem or '*'}.list (files: {have})")
    rates = np.concatenate([r for f in files for r in throughput_mbps(f)])
    pings = sorted(pdir.glob("*.list"))
    if stem is not None and (pdir / f"{stem}.list").exists():
        pings = [pdir / f"{stem}.list"]
    elif stem is not None and (pdir / "ping.list").exists():
        pings = [pdir / "ping.list"]
    if not pings:
        raise TraceError(f"trace {name!r}: no ping files in {pdir}")
    rtt = np.concatenate([ping_ms(p) for p in pings])
    return Trace(name, np.full(rates.size, GHOSHAL_SAMPLE_S), rates * 1e6 / 8, rtt,
                 source=", ".join(str(f.relative_to(traces_dir)) for f in files),
                 rtt_source=", ".join(str(p.relative_to(traces_dir)) for p in pings))


def _const(spec: str) -> Trace:
    m = re.fullmatch(r"const:([0-9.]+)\s*(kbps|mbps|gbps)(?::([0-9.]+)\s*ms)?", spec.lower())
    if not m:
        raise TraceError(f"bad constant trace {spec!r}: write e.g. const:20mbps or const:20mbps:30ms")
    scale = {"kbps": 1e3, "mbps": 1e6, "gbps": 1e9}[m.group(2)]
    bps = float(m.group(1)) * scale
    if bps <= 0:
        raise TraceError(f"{spec}: the rate must be > 0")
    rtt = float(m.group(3)) if m.group(3) else CONST_DEFAULT_RTT_MS
    return Trace(spec, np.array([1.0]), np.array([bps / 8]), np.array([rtt]), source="constant",
                 rtt_source=f"constant {rtt:g} ms" + ("" if m.group(3) else " (assumed default)"))


def available_traces(traces_dir: str | Path | None = None) -> list[str]:
    d = Path(traces_dir) if traces_dir else default_traces_dir()
    names = list(SCENARIOS) if (d / GHOSHAL_DIR).exists() else []
    names += [f"mahimahi:{p.stem}" for p in sorted((d / "mahimahi").glob("*.up"))]
    return names + ["const:<rate>mbps[:<rtt>ms]"]


def load_trace(spec: str, traces_dir: str | Path | None = None) -> Trace:
    """A trace by CLI name (see the module docstring), or a path to a mahimahi `.up` file."""
    d = Path(traces_dir) if traces_dir else default_traces_dir()
    if spec.startswith("const:"):
        return _const(spec)
    lte_driving_ping = d / GHOSHAL_DIR / "ping" / "driving" / "lte" / "ping.list"
    if spec.startswith("mahimahi:") or spec.endswith(".up"):
        path = Path(spec) if spec.endswith(".up") else d / "mahimahi" / f"{spec.split(':', 1)[1]}.up"
        if not path.exists():
            raise TraceError(f"no mahimahi trace {path}; available: {available_traces(d)}")
        if not lte_driving_ping.exists():
            raise TraceError(f"mahimahi traces take RTTs from {lte_driving_ping}, which is missing")
        seg, rate = read_mahimahi(path)
        return Trace(spec, seg, rate, ping_ms(lte_driving_ping), source=str(path.name),
                     rtt_source=str(lte_driving_ping.relative_to(d)))
    base, _, stem = spec.partition("/")
    if base in SCENARIOS:
        if not (d / GHOSHAL_DIR).exists():
            raise TraceError(f"trace {spec!r}: {d / GHOSHAL_DIR} not found (set --traces-dir)")
        tech, mobility = base.split("-")
        return _ghoshal(d, tech, mobility, stem or None, spec)
    raise TraceError(f"unknown trace {spec!r}; available: {available_traces(d)}")
