"""The adaptive policy: its estimate, its choices on synthetic bandwidth steps, and the
target on real traces (never worse than the best fixed strategy)."""
from __future__ import annotations

import numpy as np
import pytest

from mercury_onnx.runtime import bench as B
from mercury_onnx.runtime import bench_setup as BS
from mercury_onnx.runtime import bench_sim as BM
from mercury_onnx.runtime.network import Trace, load_trace
from mercury_onnx.runtime.planner import Candidate, Planner, keep_ahead, replay_s
from mercury_onnx.runtime.profiles import pi_profile, rtx4090_cloud
from tests.conftest import CIFAR_TEST, TRACES

LOCAL = Candidate("mobile-only", "mobile-only", 100.0, 0.0, 0.0, 0.80)
JPEG = Candidate("jpeg", "cloud-only-jpeg", 1.0, 16_000, 1.0, 0.80)
MERC = Candidate("mercury", "mercury", 10.0, 4_000, 1.0, 0.75)


def label(p: Planner, now: float) -> str:
    return p.candidates[p.choose(now).index].label


def test_harmonic_mean_of_finished_transfers():
    p = Planner([LOCAL, JPEG])
    p.observe_transfer(0.0, 1.0, 1000)        # 1000 B/s
    p.observe_transfer(1.0, 2.0, 3000)        # 3000 B/s
    p.observe_transfer(2.0, 99.0, 10_000)      # at t=3 10 kB/s so far: no evidence of a slowdown
    assert p.bandwidth_Bps(3.0) == pytest.approx(1500.0)           # 2 / (1/1000 + 1/3000)
    # still running at t=12: 1000 B/s so far, below the median finished rate -> it counts
    assert p.bandwidth_Bps(12.0) == pytest.approx(3 / (1 / 1000 + 1 / 3000 + 1 / 1000))
    assert p.bandwidth_Bps(0.5) is None                              # nothing finished yet


def test_expected_latency_is_over_recent_rates_with_the_hedge():
    p = Planner([LOCAL, JPEG], window=5)
    p.observe_rtt(0.0, 20.0)
    for t, dur in enumerate([0.002, 0.002, 0.002, 0.002, 2.0]):   # 8 MB/s four times, then 8 kB/s
        p.observe_transfer(t, t + dur, 16_000)
    d = p.choose(10.0)
    # at 8 MB/s: 1 + 2 + 20 + 1 = 24 ms; at 8 kB/s 2022 ms, but the hedge starts the local
    # run after 2 x 24 ms (the latency at the median rate): 48 + 100 = 148 ms
    assert d.timeout_ms == pytest.approx(48.0)
    assert d.expected_ms == pytest.approx((4 * 24.0 + 148.0) / 5)
    assert p.candidates[d.index].label == "jpeg" and d.race is None
    # the point estimate (harmonic mean, 39.8 kB/s) would have predicted 424 ms and run locally
    assert 1 + 16_000 / p.bandwidth_Bps(10.0) * 1e3 + 21 > LOCAL.device_ms


def test_a_big_upload_replays_the_states_after_a_stall():
    start, end, moved = np.array([0.0, 1.0]), np.array([0.1, 1.01]), np.array([1_000.0, 100_000.0])
    t = replay_s(16_000, start, end, moved)              # 10 kB/s for 0.1 s, then 10 MB/s
    # from the stall: its 1 kB in 0.1 s, then 15 kB at 10 MB/s; at its own rate it would be 1.6 s
    assert t[0] == pytest.approx(0.1 + 15_000 / 1e7)
    assert t[1] == pytest.approx(16_000 / 1e7)
    # no bigger than what a sample moved: bytes / its rate; more than the window: whole laps
    assert replay_s(500, start, end, moved)[0] == pytest.approx(0.05)
    assert replay_s(2 * 101_000 + 500, start, end, moved)[0] == pytest.approx(2 * 0.11 + 0.05)
    assert (replay_s(10, start, end, np.zeros(2)) == 10.0).all()   # nothing got through: 1 B/s


def test_transfers_stuck_in_one_outage_count_once():
    merc = Candidate("mercury", "mercury", 180.0, 1_300, 1.0, 0.75)
    p = Planner([Candidate("mobile-only", "mobile-only", 2000.0, 0.0, 0.0, 0.8), JPEG, merc], window=30)
    p.observe_rtt(0.0, 20.0)
    for k in range(10):                                   # 16 kB in 2 ms: 8 MB/s
        p.observe_transfer(0.5 * k, 0.5 * k + 0.002, 16_000)
    for k in range(6):                                    # six JPEGs sent into one outage, 5-9 s
        p.observe_transfer(5.0 + 4.0 * k / 6, 9.0, 16_000)
    for k in range(3):                                    # and the link is back
        p.observe_transfer(9.5 + 0.5 * k, 9.5 + 0.5 * k + 0.002, 16_000)
    w = p.sample_weights(11.0)
    assert w[10:16] == pytest.approx(np.full(6, 1 / 6)) and (w[:10] == 1).all() and (w[16:] == 1).all()
    # counted once per transfer, the outage would be 6 of 19 samples and send Mercury's small
    # payload; counted once, the JPEG is the faster choice
    outs = {c.label: p.outcomes_ms(c, p.link_samples(11.0), p.rtts_ms(11.0))[0] for c in p.candidates[1:]}
    assert outs["mercury"].mean() < outs["jpeg"].mean()
    jpeg, mercury = (outs[k] @ w / w.sum() for k in ("jpeg", "mercury"))
    assert jpeg < mercury
    d = p.choose(11.0)    # the JPEG goes first: alone, or ahead of Mercury's head (for the outage)
    assert p.candidates[d.index if d.ahead is None else d.ahead].label == "jpeg"
    assert d.expected_ms <= jpeg
    # while a transfer is still stuck, it counts in full
    p.observe_transfer(11.0, 14.0, 16_000)
    assert p.sample_weights(12.0)[-1] == 1.0


def test_choice_follows_bandwidth_steps():
    p = Planner([LOCAL, JPEG, MERC], window=5)
    p.observe_rtt(0.0, 20.0)
    for t in range(5):                         # 16 KB in 2 ms: 8 MB/s
        p.observe_transfer(t, t + 0.002, 16_000)
    assert label(p, 10.0) == "jpeg"            # 1 + 2 + 20 + 1 = 24 ms
    for t in range(10, 15):                    # 16 KB in 200 ms: 80 KB/s
        p.observe_transfer(t, t + 0.2, 16_000)
    # jpeg 1 + 200 + 20 + 1 = 222, mercury 10 + 50 + 20 + 1 = 81, local 100
    assert label(p, 20.0) == "mercury"
    for t in range(20, 25):                    # 16 KB in 2 s: 8 KB/s
        p.observe_transfer(t, t + 2.0, 16_000)
    d = p.choose(30.0)
    assert p.candidates[d.index].label == "mobile-only"
    assert p.candidates[d.race].label == "jpeg"                     # its own upload goes alongside
    for t in range(30, 35):                    # back up
        p.observe_transfer(t, t + 0.002, 16_000)
    assert label(p, 40.0) == "jpeg"


def test_slo_prefers_accuracy_then_falls_back():
    p = Planner([LOCAL, JPEG, MERC], slo_ms=60.0, window=5)
    p.observe_rtt(0.0, 20.0)
    for t in range(5):
        p.observe_transfer(t, t + 0.002, 16_000)
    assert label(p, 10.0) == "jpeg"            # most accurate within 60 ms
    for t in range(10, 15):                    # 40 KB/s: jpeg 422 ms, mercury 131 ms, local 100
        p.observe_transfer(t, t + 0.4, 16_000)
    # nothing is predicted within 60 ms; local (100 ms) can never make it, an upload might
    assert label(p, 20.0) == "mercury"
    p2 = Planner([LOCAL, JPEG, MERC], slo_ms=150.0, window=5)
    p2.observe_rtt(0.0, 20.0)
    for t in range(5):
        p2.observe_transfer(t, t + 0.4, 16_000)
    # local meets 150 ms, so an upload is hedged at 150 - 100 = 50 ms at the latest: jpeg
    # (422 ms) would end at 150 ms through the local run; local itself takes 100 ms
    d = p2.choose(10.0)
    assert p2.candidates[d.index].label == "mobile-only"
    assert p2.outcomes_ms(JPEG, p2.link_samples(10.0), p2.rtts_ms(10.0))[1] == pytest.approx(50.0)


def stepped(segments):
    seg = [d for d, _ in segments]
    return Trace("steps", seg, [r for _, r in segments], [20.0], "synthetic", "20 ms")


def simulate(trace, starts, slo_ms=None):
    strategies = [BM.Strategy("mobile-only", None, None, 100.0, np.zeros(1), 0.0, 0.8),
                  BM.Strategy("cloud-only-jpeg", None, None, 1.0, np.array([16_000.0]), 1.0, 0.8)]
    starts = np.asarray(starts, dtype=np.float64)[None]
    req = BM.Requests(starts, np.full(starts.shape, 20.0), np.zeros(starts.shape, int), np.array([0.0]))
    device = pi_profile()
    outcomes = [BM.run_fixed(st, trace, req, device) for st in strategies]
    out, choice = BM.run_planner(strategies, outcomes, trace, req, device, slo_ms=slo_ms)
    return outcomes, out, choice


def test_planner_on_a_stepped_trace_runs_local_only_in_the_slow_phase():
    fast, slow = 50e6 / 8, 50e3 / 8                                  # 50 Mbps, then 50 kbps
    starts = np.arange(0.5, 60.0, 0.5)                               # one stream over both phases
    outcomes, out, choice = simulate(stepped([(30.0, fast), (30.0, slow)]), starts)
    fast_phase, slow_phase = starts < 29.0, starts > 32.0
    assert (choice[0][fast_phase] == 1).mean() > 0.9                 # uploads while it is fast
    assert (choice[0][slow_phase] == 0).mean() > 0.9                 # local once it is slow
    # and it beats both fixed strategies on mean latency
    assert out.latency_ms.mean() < min(o.latency_ms.mean() for o in outcomes)
    # with an SLO the local run meets, the hedge starts it in time: no request misses
    _, out, _ = simulate(stepped([(30.0, fast), (30.0, slow)]), starts, slo_ms=150.0)
    assert (out.latency_ms <= 150.0 + 1e-9).all()
    assert (outcomes[1].latency_ms > 150.0).any()                    # the JPEG alone would miss


def test_a_local_run_is_raced_by_its_own_upload():
    # the probe before the stream meets 0.3 s at 10 kB/s: the first request runs locally,
    # but the link is fast again by then, and its JPEG sent alongside answers first
    outcomes, out, choice = simulate(stepped([(0.3, 10e3), (60.0, 50e6 / 8)]), [0.5, 1.0, 1.5])
    assert choice[0, 0] == 0 and out.race_rate > 0
    assert out.latency_ms[0, 0] == pytest.approx(outcomes[1].latency_ms[0, 0])
    assert out.latency_ms[0, 0] < 100.0
    assert out.energy_mj[0, 0] < outcomes[0].energy_mj[0, 0]        # the local run stopped early
    assert out.payload[0, 0] == 16_000
    assert (choice[0, 1:] == 1).all()                                 # then it uploads


def test_a_close_call_sends_the_jpeg_ahead_of_the_head():
    p = Planner([JPEG, MERC], window=4)
    p.observe_rtt(0.0, 20.0)
    for t, dur in enumerate([0.002, 0.2, 0.002, 0.2]):       # 8 MB/s and 80 kB/s in turn
        p.observe_transfer(t, t + dur, 16_000)
    d = p.choose(10.0)
    # jpeg: 24 or 222 ms (mean 123); mercury: 31.5 or 81 ms (56.25); the JPEG sent while the
    # head runs, and whichever answers first: min(24, 1 + 31.5) and min(222, 1 + 81) -> 53
    assert (d.index, d.ahead) == (1, 0)
    assert d.expected_ms == pytest.approx((24.0 + 82.0) / 2)
    slow = Planner([JPEG, MERC], window=4)                   # Mercury faster on every sample:
    slow.observe_rtt(0.0, 20.0)                              # the JPEG would only cost energy
    for t in range(4):
        slow.observe_transfer(t, t + 0.2, 16_000)
    d = slow.choose(10.0)
    assert (d.index, d.ahead) == (1, None) and d.expected_ms == pytest.approx(81.0)
    p.slo_ms = 100.0                                         # with an SLO: not (accuracy mixes)
    assert p.choose(10.0).ahead is None


def test_keep_ahead_compares_the_bytes_left_on_the_same_link():
    ahead, chosen = Candidate("jpeg", "cloud-only-jpeg", 1.0, 16_000, 1.0, 0.8), MERC
    assert keep_ahead(4_000, 10e3, ahead, chosen)            # as many bytes left as Mercury's payload
    assert not keep_ahead(4_001, 10e3, ahead, chosen)
    slow_cloud = Candidate("jpeg", "cloud-only-jpeg", 1.0, 16_000, 100.0, 0.8)
    # the full model takes 99 ms longer in the cloud: worth 990 B at 10 kB/s
    assert keep_ahead(3_010, 10e3, slow_cloud, chosen) and not keep_ahead(3_011, 10e3, slow_cloud, chosen)
    assert not keep_ahead(4_000, 10e3, ahead, chosen, payload_bytes=3_999)   # this image's payload, not the mean


@pytest.mark.parametrize("rate,jpeg_answers", [(50e6 / 8, True), (20e3, False)])
def test_the_jpeg_ahead_answers_or_is_stopped_when_the_head_is_done(rate, jpeg_answers):
    trace = stepped([(60.0, rate)])
    jpeg = BM.Strategy("cloud-only-jpeg", None, None, 2.0, np.array([16_000.0]), 5.0, 0.8)
    merc = BM.Strategy("mercury", 0.25, "codec", 50.0, np.array([1_000.0]), 3.0, 0.78)
    req = BM.Requests(np.array([[1.0]]), np.array([[20.0]]), np.zeros((1, 1), int), np.array([0.0]))
    device = pi_profile()
    ob, oa = (BM.run_fixed(st, trace, req, device) for st in (jpeg, merc))
    cb, ca = (Candidate(st.label, st.method, st.device_ms, 1.0, st.cloud_ms, st.top1) for st in (jpeg, merc))
    cb.payload_bytes, ca.payload_bytes = 16_000, 1_000
    out = {f: np.zeros((1, 1)) for f in BM.FIELDS}
    p = Planner([cb, ca])
    assert BM.upload_ahead(out, 0, 0, 1.0, ob, oa, cb, ca, trace, p, device) == jpeg_answers
    if jpeg_answers:        # 16 kB at 50 Mbps: sent in 2.6 ms, long before the 50 ms head is done
        assert out["latency_ms"][0, 0] == pytest.approx(ob.latency_ms[0, 0])
        assert out["payload"][0, 0] == 16_000 and out["energy_mj"][0, 0] > ob.energy_mj[0, 0]
    else:                   # 20 kB/s: 1 kB sent by then, 15 kB left > 1 kB: stopped, Mercury sent
        assert out["latency_ms"][0, 0] == pytest.approx(2.0 + 50.0 + 1_000 / rate * 1e3 + 20.0 + 3.0)
        assert out["payload"][0, 0] == pytest.approx(rate * 0.05 + 1_000)
        assert out["accuracy"][0, 0] == 0.78
    assert len(p.transfers) == (1 if jpeg_answers else 2)    # what the device learns from


@pytest.mark.skipif(not (TRACES.exists() and CIFAR_TEST.exists()), reason="shared data missing")
@pytest.mark.parametrize("trace", ["lte-static", "mahimahi:TMobile-LTE-short"])
def test_never_worse_than_the_best_fixed_strategy_on_real_traces(trace):
    """DeiT-T on the Pi profile: the two traces where the point-estimate planner was worse
    (a slow probe or transfer sent a few requests to the 147 ms local run)."""
    setup = BS.setup_from_name("deit_tiny_patch16_224", [0.5, 0.25])
    cfg = B.BenchConfig(traces=[load_trace(trace)], requests=2000)
    report, _ = B.run_bench(setup, pi_profile(), rtx4090_cloud(), B.sample_images(CIFAR_TEST, 8), cfg, [])
    rep = report["planner"][trace]
    assert rep["never_worse"], rep
    assert rep["choices"]["cloud-only-jpeg"] > 0.9
