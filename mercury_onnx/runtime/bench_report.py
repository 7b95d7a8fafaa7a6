"""The bench's human outputs: a text table per trace, the planner comparison, PNG plots."""
from __future__ import annotations

from pathlib import Path


def _label(r: dict) -> str:
    if r["keep_ratio"] is None:
        return r["method"]
    return f"{r['method']} r={r['keep_ratio']:.3g} {r['token_dtype']}"


def speedups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean-latency speed-up of every row vs mobile-only and each cloud-only, per trace row."""
    base = {r["method"]: r["latency_ms"]["mean"] for r in rows
            if r["method"] in ("mobile-only", "cloud-only-jpeg", "cloud-only-hq")}
    return {_label(r): {f"vs {b}": base[b] / r["latency_ms"]["mean"] for b in base} for r in rows}


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}   model: {report['model']}   cloud: {report['cloud']['name']}"]
    src = report.get("accuracy_source")
    if src:
        lines.append(f"top1 from {src['file']} ({src['dataset']}, {src['images']} images)")
    by_trace: dict[str, list[dict]] = {}
    for r in report["results"]:
        by_trace.setdefault(r["trace"], []).append(r)
    head = (f"{'strategy':<26} {'p50':>8} {'p95':>9} {'mean':>9} | {'device':>7} {'tx':>8} {'rtt':>6} "
            f"{'cloud':>6} | {'bytes':>7} {'mJ':>7} {'top1':>6} | {'x mob':>6} {'x jpg':>6} {'x hq':>6}  measured")
    for trace, rows in by_trace.items():
        info = report["traces"][trace]
        lines += ["", f"trace {trace}: {info['mean_mbps']:.1f} Mbps mean over {info['duration_s']:.0f} s, "
                      f"{info['requests']} requests (latencies in ms)", head, "-" * len(head)]
        sp = speedups(rows)
        for r in rows:
            lab, b, lat = _label(r), r["breakdown_ms"], r["latency_ms"]
            s = sp[lab]
            top1 = "-" if r["top1"] is None else f"{r['top1']:.4f}"
            lines.append(
                f"{lab:<26} {lat['p50']:8.1f} {lat['p95']:9.1f} {lat['mean']:9.1f} | {b['device_compute']:7.1f} "
                f"{b['transmission']:8.1f} {b['rtt']:6.1f} {b['cloud_compute']:6.2f} | {r['payload_bytes']:7d} "
                f"{r['energy_mj']:7.1f} {top1:>6} | {s.get('vs mobile-only', 0):6.2f} "
                f"{s.get('vs cloud-only-jpeg', 0):6.2f} {s.get('vs cloud-only-hq', 0):6.2f}  "
                f"{','.join(m.split(' ')[0] for m in r['measured']) or 'modelled'}")
        p = report["planner"][trace]
        me, best = p["planner"], p["best"]
        slo = report["slo_ms"]
        viol = (lambda x: "" if slo is None else f", SLO {slo:g} ms violated {100 * x['slo_violation_rate']:.1f}%")
        acc = "accuracy" if p["accuracy_basis"].startswith("top1") else "proxy accuracy"
        lines.append(f"planner: mean {me['mean_latency_ms']:.1f} ms, {acc} {me['mean_accuracy']:.4f}{viol(me)}; "
                     f"best fixed ({p['basis']}): {p['best_fixed']} mean {best['mean_latency_ms']:.1f} ms, "
                     f"{acc} {best['mean_accuracy']:.4f}{viol(best)} -> "
                     f"{'strictly better' if p['strictly_better'] else 'never worse' if p['never_worse'] else 'WORSE'}")
        lines.append("  chose: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                             sorted(p["choices"].items(), key=lambda kv: -kv[1]))
                     + f"; answered by the local hedge {100 * p['fallback_rate']:.1f}%, by the upload "
                       f"alongside a local run {100 * p.get('race_rate', 0.0):.1f}%, by the JPEG sent ahead of "
                       f"a head {100 * p.get('ahead_rate', 0.0):.1f}% (sent {100 * p.get('ahead_sent_rate', 0.0):.1f}%)")
    vs = report.get("mercury_vs_mobile", {})
    if vs:
        lines += ["", "Mercury speed-up over mobile-only (mean / median latency):"]
        for label, v in vs.items():
            per = "  ".join(f"{t} {x['mean']:.2f}/{x['p50']:.2f}" for t, x in v["per_trace"].items())
            lines.append(f"  {label}: {per}  | all requests pooled {v['pooled_mean']:.2f}/{v['pooled_p50']:.2f}, "
                         f"geomean of trace means {v['geomean_of_trace_means']:.2f}")
    lines += ["", "x mob / x jpg / x hq: mean-latency speed-up vs mobile-only / cloud-only-jpeg / cloud-only-hq.",
              "measured: parts measured in this run or by the device profile; everything else is modelled "
              "(see the JSON's device_profile, cloud and strategies notes)."]
    return "\n".join(lines)


def plot(report: dict, outcomes_by_trace: dict, plot_dir: str | Path) -> list[Path]:
    """Latency CDF per trace, and accuracy vs mean latency. Needs matplotlib (skipped without)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return []
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for trace, curves in outcomes_by_trace.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, lat in curves.items():
            x = np.sort(lat.ravel())
            style = "--" if label.startswith("janus") else ":" if label.startswith("cloud") else "-"
            ax.plot(x, np.arange(1, x.size + 1) / x.size, style, label=label,
                    lw=2.2 if label == "mercury-adaptive" else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end latency (ms, log)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{report['model']} on {report['device']}, trace {trace}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
        safe = trace.replace(":", "_").replace("/", "_")
        path = plot_dir / f"latency_cdf_{safe}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    rows = [r for r in report["results"] if r["top1"] is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for trace in outcomes_by_trace:
            tr = [r for r in rows if r["trace"] == trace]
            ax.scatter([r["latency_ms"]["mean"] for r in tr], [r["top1"] for r in tr], label=trace, s=18)
            for r in tr:
                if r["method"] in ("mobile-only", "mercury-adaptive"):
                    ax.annotate(r["method"], (r["latency_ms"]["mean"], r["top1"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("mean latency (ms, log)")
        ax.set_ylabel("top-1")
        ax.set_title(f"accuracy vs latency: {report['model']} on {report['device']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = plot_dir / "accuracy_vs_latency.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
