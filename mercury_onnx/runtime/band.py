"""bench --band: the range of constant uplink rates where Mercury is the fastest strategy.

Over a log grid of constant uplink rates (0.01..100 Mbps), every strategy's mean latency is

    device compute + mean payload bytes * 8 / rate + RTT + cloud compute     (mobile-only: device)

with one RTT for all offloading strategies: the mean of the RTT samples of the bench's trace
files (the real ping files). A Mercury variant's band is the set of rates where it is faster
than both mobile-only and cloud-only-jpeg (JPEG q90 of the real images at the model's input).
Latency is linear in 1/rate, so against each rival the variant wins on one side of an exact
crossing rate; `band_mbps` is the intersection of those half-lines within the grid's range,
[lo, hi] in Mbps, or None when empty. `mercury` (any variant) is the union of the variants'
bands, [lo, hi] when they overlap. The grid (latency curves, plot) shows the same thing. Compute times come from the same device/cloud profiles as the
trace bench (modelled for the `pi` profile), payloads from the real encoders.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

RATES_MBPS = np.logspace(-2, 2, 81)        # 0.01 .. 100 Mbps, 20 points per decade
RIVALS = ("mobile-only", "cloud-only-jpeg")


def mean_latency_ms(st, rate_mbps: np.ndarray, rtt_ms: float) -> np.ndarray:
    """Mean latency of a strategy (bench.Strategy) at each constant rate."""
    if not st.offloads:
        return np.full(rate_mbps.shape, st.device_ms)
    tx_ms = float(st.payload.mean()) * 8 / (rate_mbps * 1e6) * 1e3
    return st.device_ms + tx_ms + rtt_ms + st.cloud_ms


def exact_band(st, rivals: list, rtt_ms: float, lo: float, hi: float) -> list[float] | None:
    """Rates in [lo, hi] Mbps where strategy st beats every rival: T_s + 8 P_s / R < T_r + 8 P_r / R
    for each, with T the fixed milliseconds and P the mean payload bytes (8 P / R ms at R Mbps
    is 8 P / (1e3 R))."""
    def fixed(x):
        return x.device_ms + (rtt_ms + x.cloud_ms if x.offloads else 0.0)

    def bits(x):
        return 8 * float(x.payload.mean()) if x.offloads else 0.0

    for r in rivals:
        a, c = fixed(st) - fixed(r), (bits(r) - bits(st)) / 1e3      # win iff a < c / R
        if c > 0:
            hi = hi if a <= 0 else min(hi, c / a)
        elif c < 0:
            if a >= 0:
                return None
            lo = max(lo, c / a)
        elif a >= 0:
            return None
    return [float(lo), float(hi)] if lo < hi else None


def _union(bands: list) -> list[float] | None:
    """[lo, hi] of overlapping intervals; the widest connected one holding the most when not."""
    bands = sorted(b for b in bands if b)
    if not bands:
        return None
    runs = [list(bands[0])]
    for lo, hi in bands[1:]:
        if lo <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], hi)
        else:
            runs.append([lo, hi])
    return max(runs, key=lambda b: np.log(b[1] / b[0]))


def compute_band(strategies: list, rtt_ms: float, rates: np.ndarray = RATES_MBPS) -> dict:
    """{"rtt_ms", "rates_mbps", "strategies": {label: {latency_ms (on the grid), band_mbps
    (exact edges), grid_wins, payload_bytes}}, "mercury": {band_mbps, best (per grid rate)}}."""
    lat = {st.label: mean_latency_ms(st, rates, rtt_ms) for st in strategies}
    rivals = [st.label for st in strategies if st.method in RIVALS]
    if len(rivals) != len(RIVALS):
        raise ValueError(f"the band needs both {RIVALS} among the strategies")
    rival = np.min([lat[r] for r in rivals], axis=0)
    rival_st = [st for st in strategies if st.method in RIVALS]
    out = {}
    for st in strategies:
        row = {"method": st.method, "keep_ratio": st.keep_ratio, "token_dtype": st.token_dtype,
               "payload_bytes": float(st.payload.mean()) if st.offloads else 0.0,
               "latency_ms": [round(float(v), 3) for v in lat[st.label]]}
        if st.method == "mercury":
            row["band_mbps"] = exact_band(st, rival_st, rtt_ms, float(rates[0]), float(rates[-1]))
            row["grid_wins"] = int((lat[st.label] < rival).sum())
        out[st.label] = row
    merc = [st.label for st in strategies if st.method == "mercury"]
    best = {"band_mbps": None, "best": []}
    if merc:
        m = np.stack([lat[k] for k in merc])                              # (V, R)
        best["band_mbps"] = _union([out[k]["band_mbps"] for k in merc])
        best["best"] = [merc[i] if w else None for i, w in zip(m.argmin(0), m.min(0) < rival)]
    return {"rtt_ms": rtt_ms, "rates_mbps": [float(r) for r in rates], "rivals": list(RIVALS),
            "strategies": out, "mercury": best}


def format_band(band: dict, model: str, device: str) -> str:
    lines = [f"Band (constant uplink {band['rates_mbps'][0]:g}..{band['rates_mbps'][-1]:g} Mbps, "
             f"RTT {band['rtt_ms']:.1f} ms from the trace files; {model} on {device}): rates where Mercury "
             f"beats both mobile-only and cloud-only-jpeg"]
    for label, row in band["strategies"].items():
        if row["method"] != "mercury":
            continue
        b = row["band_mbps"]
        txt = "empty" if b is None else f"[{b[0]:.3g}, {b[1]:.3g}] Mbps"
        lines.append(f"  {label:32} {row['payload_bytes']:9.0f} B  {txt}")
    b = band["mercury"]["band_mbps"]
    lines.append(f"  {'mercury (best variant per rate)':32} {'':11}  "
                 + ("empty" if b is None else f"[{b[0]:.3g}, {b[1]:.3g}] Mbps"))
    return "\n".join(lines)


def plot_band(band: dict, title: str, path: str | Path) -> Path | None:
    """Mean latency vs uplink rate, every strategy, Mercury's band shaded. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rates = np.asarray(band["rates_mbps"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, row in band["strategies"].items():
        style = "-" if row["method"] == "mercury" else "--"
        ax.plot(rates, row["latency_ms"], style, lw=2 if row["method"] in RIVALS else 1.1, label=label)
    b = band["mercury"]["band_mbps"]
    if b is not None:
        ax.axvspan(b[0], b[1], color="tab:green", alpha=0.12, label=f"Mercury fastest: {b[0]:.3g}-{b[1]:.3g} Mbps")
    log_axes(ax, "constant uplink rate (Mbps, log)", "mean latency (ms, log)", title, legend_size=6, log_y=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_axes(ax, xlabel: str, ylabel: str, title: str, legend_size: int = 7, log_y: bool = False) -> None:
    """The style of the rate plots (this band, eval's rate-accuracy curve): log x (and y), the
    labels, a small title, a light grid on both tick levels, the legend."""
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size)
