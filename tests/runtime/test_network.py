"""Trace loaders on the real files, and transmission time against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from mercury_onnx.runtime.network import (Trace, TraceError, load_trace, ping_ms, read_list_runs,
                                          read_mahimahi, throughput_mbps)
from tests.conftest import TRACES

G = TRACES / "ghoshal2022-5g-mmwave-uplink"
needs_traces = pytest.mark.skipif(not G.exists(), reason=f"traces not found at {TRACES}")


def hand_trace():
    # 1 s at 1000 B/s, 1 s dead, 1 s at 2000 B/s: 3000 B per 3 s period
    return Trace("hand", [1.0, 1.0, 1.0], [1000.0, 0.0, 2000.0], [10.0], "hand", "hand")


@pytest.mark.parametrize("nbytes,t0,expected", [
    (500, 0.0, 0.5),          # inside the first segment
    (1500, 0.0, 2.25),        # 1000 B, wait out the dead second, 500 B at 2000 B/s
    (600, 0.5, 1.55),         # 500 B, dead second, 100 B at 2000 B/s
    (2000, 2.5, 1.5),         # 1000 B to the end, wrap around, 1000 B at 1000 B/s
    (3000, 0.0, 3.0),         # exactly one period
    (6500, 0.0, 6.5),         # two periods and 500 B
    (1000, 1.2, 1.3),         # start in the dead second: wait 0.8 s, then 0.5 s
    (0, 1.7, 0.0),
])
def test_transmit_hand_cases(nbytes, t0, expected):
    assert hand_trace().transmit_s(nbytes, t0) == pytest.approx(expected, abs=1e-9)


def test_transmit_vectorised_and_consistent_with_bytes_until():
    tr = hand_trace()
    t0 = np.linspace(0, 9, 37)
    dt = tr.transmit_s(1234.0, t0)
    assert np.allclose(tr.bytes_until(t0 + dt) - tr.bytes_until(t0), 1234.0)


def test_const_trace():
    tr = load_trace("const:20mbps:30ms")
    assert tr.transmit_s(2_500_000, 0.3) == pytest.approx(1.0)
    assert tr.rtt_ms.tolist() == [30.0]
    assert load_trace("const:8kbps").transmit_s(1000, 0.0) == pytest.approx(1.0)
    with pytest.raises(TraceError, match="const:20mbps"):
        load_trace("const:fast")


def test_mahimahi_binning(tmp_path):
    f = tmp_path / "t.up"
    f.write_text("0\n0\n2\n")          # two packets in ms 0, none in ms 1, one in ms 2
    seg, rate = read_mahimahi(f)
    assert seg.tolist() == [1e-3] * 3 and (rate * 1e-3).tolist() == [3000.0, 0.0, 1500.0]
    tr = Trace("t", seg, rate, [1.0], "t", "t")
    assert tr.transmit_s(4500, 0.0) == pytest.approx(3e-3)
    assert tr.transmit_s(3000, 0.0) == pytest.approx(1e-3)


@needs_traces
def test_ghoshal_files_parse_with_the_documented_layout():
    runs = read_list_runs(G / "throughput/driving/5g/throughput.list")
    assert len(runs) == 8 and all(len(r) == 4 for r in runs)        # ts, tput, ts, tput
    assert [len(r[0]) for r in runs[:3]] == [3550, 3681, 5218]
    assert np.allclose(np.diff(runs[0][0]), 0.1, atol=1e-6)          # 0.1 s timestamps
    assert [len(v) for v in throughput_mbps(G / "throughput/static/lte/away_p1.list")] == [154, 154, 152, 154, 151, 152]
    assert len(throughput_mbps(G / "throughput/driving/lte/throughput.list")) == 10
    assert len(throughput_mbps(G / "throughput/walking/5g/lateral.list")) == 9
    assert ping_ms(G / "ping/driving/5g/ping.list").size == 6689 + 4111 + 4761


@needs_traces
@pytest.mark.parametrize("name,lo,hi", [
    ("lte-static", 20, 66), ("lte-walking", 20, 66), ("lte-driving", 10, 66),
    ("5g-static", 40, 175), ("5g-walking", 30, 160), ("5g-driving", 5, 150),
])
def test_ghoshal_scenarios(name, lo, hi):
    tr = load_trace(name)
    tech, mob = name.split("-")
    samples = np.concatenate([v for f in sorted((G / "throughput" / mob / tech).glob("*.list"))
                              for v in throughput_mbps(f)])
    assert tr.seg_s.size == samples.size and tr.duration_s == pytest.approx(0.1 * samples.size)
    assert samples.min() <= tr.mean_mbps <= samples.max()
    assert lo < tr.mean_mbps < hi                                     # README: LTE peaks 46-65 Mbps
    assert samples.max() < {"lte": 66, "5g": 175}[tech]
    assert 5 < np.median(tr.rtt_ms) < 60 and tr.rtt_source.startswith("ghoshal2022")
    # one transfer at a random time: at least its bytes at the peak rate
    t = tr.transmit_s(100_000, np.random.default_rng(0).uniform(0, tr.duration_s, 50))
    assert (t >= 100_000 * 8 / (samples.max() * 1e6) - 1e-9).all()


@needs_traces
def test_mahimahi_real_files():
    lines = (TRACES / "mahimahi/TMobile-LTE-short.up").read_text().split()
    tr = load_trace("mahimahi:TMobile-LTE-short")
    assert tr.cum_bytes[-1] == pytest.approx(len(lines) * 1500)
    assert tr.duration_s == pytest.approx((int(lines[-1]) + 1) / 1000)
    assert 5 < tr.mean_mbps < 20
    assert load_trace("mahimahi:ATT-LTE-driving-2016").mean_mbps < tr.mean_mbps
    with pytest.raises(TraceError, match="available"):
        load_trace("mahimahi:Nope")
    with pytest.raises(TraceError, match="5g-driving"):
        load_trace("6g-driving")
    assert load_trace("lte-walking/lateral").source.endswith("walking/lte/lateral.list")
