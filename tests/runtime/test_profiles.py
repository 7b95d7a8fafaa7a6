"""Device/cloud profiles and the analytic FLOPs they divide."""
from __future__ import annotations

import json

import pytest

from mercury_onnx.runtime import vit_flops as VF
from mercury_onnx.runtime.profiles import (DEIT_B_FLOPS, DeviceProfile, ProfileError, load_device_profile,
                                           pi_profile, rtx4090_cloud)


def test_pi_profile_reproduces_the_papers_mobile_only_deit_b():
    g = VF.VitGeometry.from_timm_name("deit_base_patch16_224")
    assert VF.vanilla_flops(g) == DEIT_B_FLOPS
    p = pi_profile()
    ms, measured = p.compute_ms(DEIT_B_FLOPS)
    assert ms == pytest.approx(5.06 * 407, rel=1e-6) and not measured
    assert 16 < p.gflops < 18
    assert "assumption" in p.radio_source and "not measured" in p.power_source


def test_cloud_profile_scales_by_flops():
    c = rtx4090_cloud()
    assert c.compute_ms(DEIT_B_FLOPS)[0] == pytest.approx(0.86)
    assert c.compute_ms(DEIT_B_FLOPS / 4)[0] == pytest.approx(0.86 / 4)


def test_measured_graph_time_wins_only_for_the_same_export(tmp_path):
    p = pi_profile()
    p.graph_ms, p.model_id = {"full.onnx": 12.5}, "abcd"
    assert p.compute_ms(1e9, "full.onnx", "abcd") == (12.5, True)
    assert p.compute_ms(1e9, "full.onnx", "other")[1] is False
    f = tmp_path / "dev.json"
    f.write_text(json.dumps(p.to_json()))
    q = load_device_profile(str(f))
    assert q.graph_ms == {"full.onnx": 12.5} and q.gflops == p.gflops
    f.write_text("{}")
    with pytest.raises(ProfileError, match="not a device profile"):
        load_device_profile(str(f))
    with pytest.raises(ProfileError, match="pi, host"):
        load_device_profile("toaster")


def test_energy_adds_compute_radio_and_waiting():
    p = DeviceProfile("x", 10.0, "", active_w=5.0, idle_w=2.0, power_source="", radio_base_w=1.0,
                      radio_j_per_byte=1e-6)
    # 5 W * 10 ms + (2 + 1) W * 20 ms + 1000 B * 1 uJ + 2 W * 30 ms = 50 + 60 + 1 + 60 mJ
    assert p.energy_mj(10.0, 20.0, 1000, 30.0) == pytest.approx(171.0)


def test_analytic_flops_of_the_reference_geometry():
    g = VF.VitGeometry(num_patches=64, dim=192, depth=12, patch_size=4, num_classes=10)
    blk = 24 * 65 * 192 ** 2 + 4 * 65 ** 2 * 192
    assert VF.vanilla_flops(g) == 2 * 64 * 48 * 192 + 12 * blk + 2 * 192 * 10
    assert VF.head_flops(g, 1) + VF.tail_flops(g, 1) == VF.vanilla_flops(g)
    assert VF.janus_schedule(196, 49, 3) == [112, 70, 49]


def _torch_split_flops(name):
    """models.flops.split_flops on timm's unfused attention path (torch's flop counter does not
    see the fused SDPA kernel's matmuls on CPU, so the fused path undercounts attention)."""
    pytest.importorskip("timm")
    from timm.layers import set_fused_attn

    from mercury_onnx.models import MercuryConfig, build_mercury
    from mercury_onnx.models.flops import split_flops

    set_fused_attn(False)
    try:
        return split_flops(build_mercury(MercuryConfig(timm_model=name, keep_ratio=0.25)))
    finally:
        set_fused_attn(True)


@pytest.mark.parametrize("name", [
    "deit_tiny_patch16_224",
    pytest.param("deit_small_patch16_224", marks=pytest.mark.slow),
    pytest.param("deit_base_patch16_224", marks=pytest.mark.slow),
])
def test_analytic_flops_match_torch_counter(name):
    f = _torch_split_flops(name)
    g = VF.VitGeometry.from_timm_name(name)
    assert VF.head_flops(g, 1) == pytest.approx(f["head"], rel=0.02)
    assert VF.tail_flops(g, 1) == pytest.approx(f["vanilla_tail"], rel=0.02)
    assert VF.vanilla_flops(g) == pytest.approx(f["vanilla"], rel=0.02)


def test_profile_cli_measures_and_bench_uses_it(ref_export, tmp_path):
    from typer.testing import CliRunner

    from mercury_onnx.cli import app

    out = tmp_path / "dev.json"
    r = CliRunner().invoke(app, ["profile", "--export", str(ref_export), "--out", str(out), "--name", "box",
                                 "--repeats", "3"])
    assert r.exit_code == 0, r.output
    prof = load_device_profile(str(out))
    manifest = json.loads((ref_export / "manifest.json").read_text())
    assert prof.measured_gflops and prof.model_id == manifest["model_id"]
    assert {"full.onnx", "head_k16.onnx", "head_k16_tok8.onnx"} <= set(prof.graph_ms)
    # the measured full.onnx time is what a bench with this profile reports for mobile-only
    assert prof.compute_ms(1.0, "full.onnx", manifest["model_id"]) == (prof.graph_ms["full.onnx"], True)
    flops = VF.vanilla_flops(VF.VitGeometry.from_manifest(manifest))
    assert prof.gflops == pytest.approx(flops / prof.graph_ms["full.onnx"] / 1e6)
