"""The adaptive policy's choices on synthetic bandwidth steps."""
from __future__ import annotations

import numpy as np
import pytest

from mercury_onnx.runtime import bench as B
from mercury_onnx.runtime.network import Trace
from mercury_onnx.runtime.planner import Candidate, Planner
from mercury_onnx.runtime.profiles import pi_profile

LOCAL = Candidate("mobile-only", "mobile-only", 100.0, 0.0, 0.0, 0.80)
JPEG = Candidate("jpeg", "cloud-only-jpeg", 1.0, 16_000, 1.0, 0.80)
MERC = Candidate("mercury", "mercury", 10.0, 4_000, 1.0, 0.75)


def test_harmonic_mean_of_finished_transfers():
    p = Planner([LOCAL, JPEG])
    p.observe_transfer(0.0, 1.0, 1000)        # 1000 B/s
    p.observe_transfer(1.0, 2.0, 3000)        # 3000 B/s
    p.observe_transfer(2.0, 99.0, 10_000)      # at t=3 10 kB/s so far: no evidence of a slowdown
    assert p.bandwidth_Bps(3.0) == pytest.approx(1500.0)           # 2 / (1/1000 + 1/3000)
    # still running at t=12: 1000 B/s so far, below the estimate -> it counts
    assert p.bandwidth_Bps(12.0) == pytest.approx(3 / (1 / 1000 + 1 / 3000 + 1 / 1000))


def test_choice_follows_bandwidth_steps():
    p = Planner([LOCAL, JPEG, MERC])
    p.observe_rtt(0.0, 20.0)
    for t in range(5):                         # 16 KB in 2 ms: 8 MB/s
        p.observe_transfer(t, t + 0.002, 16_000)
    assert p.candidates[p.choose(10.0)[0]].label == "jpeg"          # 1 + 2 + 20 + 1 = 24 ms
    for t in range(10, 15):                    # 16 KB in 200 ms: 80 KB/s
        p.observe_transfer(t, t + 0.2, 16_000)
    # jpeg 1 + 200 + 20 + 1 = 222, mercury 10 + 50 + 20 + 1 = 81, local 100
    assert p.candidates[p.choose(20.0)[0]].label == "mercury"
    for t in range(20, 25):                    # 16 KB in 2 s: 8 KB/s
        p.observe_transfer(t, t + 2.0, 16_000)
    assert p.candidates[p.choose(30.0)[0]].label == "mobile-only"
    for t in range(30, 35):                    # back up
        p.observe_transfer(t, t + 0.002, 16_000)
    assert p.candidates[p.choose(40.0)[0]].label == "jpeg"


def test_slo_prefers_accuracy_then_falls_back():
    p = Planner([LOCAL, JPEG, MERC], slo_ms=60.0)
    p.observe_rtt(0.0, 20.0)
    for t in range(5):
        p.observe_transfer(t, t + 0.002, 16_000)
    assert p.candidates[p.choose(10.0)[0]].label == "jpeg"          # most accurate within 60 ms
    for t in range(10, 15):                    # 40 KB/s: jpeg 422 ms, mercury 131 ms, local 100
        p.observe_transfer(t, t + 0.4, 16_000)
    # nothing is predicted within 60 ms; local (100 ms) can never make it, an upload might
    assert p.candidates[p.choose(20.0)[0]].label == "mercury"
    p2 = Planner([LOCAL, JPEG, MERC], slo_ms=150.0)
    p2.observe_rtt(0.0, 20.0)
    for t in range(5):
        p2.observe_transfer(t, t + 0.4, 16_000)
    # within 150 ms: local (0.80, 100 ms) and mercury (0.75, 131 ms): the more accurate wins
    assert p2.candidates[p2.choose(10.0)[0]].label == "mobile-only"


def test_planner_on_a_stepped_trace_runs_local_only_in_the_slow_phase():
    fast, slow = 50e6 / 8, 50e3 / 8                                  # 50 Mbps, then 50 kbps
    trace = Trace("steps", [30.0, 30.0], [fast, slow], [20.0], "synthetic", "20 ms")
    strategies = [B.Strategy("mobile-only", None, None, 100.0, np.zeros(1), 0.0, 0.8),
                  B.Strategy("cloud-only-jpeg", None, None, 1.0, np.array([16_000.0]), 1.0, 0.8)]
    starts = np.arange(0.5, 60.0, 0.5)[None]                         # one stream over both phases
    req = B.Requests(starts, np.full(starts.shape, 20.0), np.zeros(starts.shape, int), np.array([0.0]))
    device = pi_profile()
    outcomes = [B.run_fixed(st, trace, req, device) for st in strategies]
    out, choice = B.run_planner(strategies, outcomes, trace, req, device, slo_ms=None)
    fast_phase, slow_phase = starts[0] < 29.0, starts[0] > 32.0
    assert (choice[0][fast_phase] == 1).mean() > 0.9                 # uploads while it is fast
    assert (choice[0][slow_phase] == 0).mean() > 0.9                 # local once it is slow
    # and it beats both fixed strategies on mean latency
    assert out.latency_ms.mean() < min(o.latency_ms.mean() for o in outcomes)
