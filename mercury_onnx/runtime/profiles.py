"""Device and cloud profiles: how long compute takes, and what it costs in energy.

A device profile turns FLOPs into milliseconds (an effective GFLOP/s for ViT graphs under
onnxruntime) unless it holds a measured time for that exact graph, and turns time and bytes
into device energy. Every number carries its source; `measured` says which are ours.

`pi` (Raspberry Pi 4 Model B, 4x Cortex-A72 @ 1.5 GHz), all modelled:
- throughput: the Mercury paper's mobile-only DeiT-B latency on the Pi, 5.06 x 407 ms
  (Mercury's latency times its speed-up over mobile-only) = 2.059 s. DeiT-B at 224 is
  35.13 GFLOP per image counting 2 FLOPs per MAC with the attention matmuls
  (`vit_flops.vanilla_flops`, the same convention this module divides by), so
  35.13 / 2.059 = 17.1 GFLOP/s effective. (Without the attention matmuls, 33.82 GFLOP, one
  gets 16.4: the brief's "about 16".) Using the same FLOP convention for the derivation and
  for the model makes mobile-only DeiT-B come out at exactly the paper's 2.06 s.
- power: published bare-board measurements of a Pi 4B, about 2.7 W idle and 6.4 W with
  all four cores loaded (e.g. Tom's Hardware's and RasPi.TV's 2019 Pi 4 reviews). An
  approximation, not measured here.
- radio: the Pi has no cellular modem; we assume a USB LTE/5G modem following the LTE
  uplink power model of Huang et al., MobiSys 2012 ("A Close Examination of Performance
  and Power Characteristics of 4G LTE Networks"): P = alpha_u * throughput + beta,
  alpha_u = 438.39 mW/Mbps, beta = 1288.04 mW. So energy = beta * t_tx + 3.507 uJ/byte.
  Applied to 5G too, and the RRC tail energy is not counted: both assumptions.

`host`: this machine, measured by running the export's ONNX graphs (`measure_device`).
FILE.json: a profile written by `mercury-onnx profile` on the real device.

Cloud: `rtx4090` is the paper's 0.86 ms for DeiT-B on an RTX 4090, scaled by FLOPs to other
graphs (modelled); `local` measures the tail and full graphs here with onnxruntime on CPU.
numpy + onnxruntime only.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PROFILE_FORMAT = "mercury-device-profile/1"
DEIT_B_FLOPS = 35_127_656_448                 # vit_flops.vanilla_flops(deit_base_patch16_224)
PAPER_PI_DEIT_B_S = 5.06 * 0.407              # mobile-only DeiT-B on the Pi, from the paper
PAPER_4090_DEIT_B_MS = 0.86                   # DeiT-B on an RTX 4090, from the paper

HUANG_ALPHA_MW_PER_MBPS = 438.39
HUANG_BETA_MW = 1288.04
RADIO_J_PER_BYTE = HUANG_ALPHA_MW_PER_MBPS * 1e-3 * 8 / 1e6   # 3.507e-6 J per byte
RADIO_SOURCE = ("assumption: USB LTE/5G modem following Huang et al. MobiSys 2012 LTE uplink model "
                "(alpha_u=438.39 mW/Mbps, beta=1288.04 mW), applied to 5G too, RRC tail not counted")


class ProfileError(ValueError):
    """A profile name or file we cannot use."""


@dataclass
class DeviceProfile:
    name: str
    gflops: float                      # effective GFLOP/s (2 FLOPs per MAC) on ViT graphs
    gflops_source: str
    active_w: float                    # whole device, CPU busy
    idle_w: float                      # whole device, waiting for the network
    power_source: str
    radio_base_w: float = HUANG_BETA_MW / 1e3
    radio_j_per_byte: float = RADIO_J_PER_BYTE
    radio_source: str = RADIO_SOURCE
    measured_gflops: bool = False
    graph_ms: dict = field(default_factory=dict)       # measured median ms per graph file
    model_id: str | None = None                         # the export graph_ms belongs to
    machine: str = ""

    def compute_ms(self, flops: float, graph: str | None = None,
                   model_id: str | None = None) -> tuple[float, bool]:
        """(milliseconds, measured?) for a graph of `flops` FLOPs: the measured time of that
        exact graph when the profile has it, else FLOPs / effective throughput."""
        if graph is not None and graph in self.graph_ms and model_id is not None and model_id == self.model_id:
            return float(self.graph_ms[graph]), True
        return flops / (self.gflops * 1e9) * 1e3, False

    def energy_mj(self, compute_ms, tx_ms, nbytes, wait_ms):
        """Device energy of one request: CPU busy for compute, radio on while sending (plus
        per-byte energy), idle while waiting for the RTT and the cloud."""
        return (self.active_w * compute_ms + (self.idle_w + self.radio_base_w) * tx_ms
                + self.radio_j_per_byte * 1e3 * nbytes + self.idle_w * wait_ms)

    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "DeviceProfile":
        if d.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"not a device profile (format {d.get('format')!r}, expected {PROFILE_FORMAT!r})")
        d = {k: v for k, v in d.items() if k != "format"}
        try:
            return cls(**d)
        except TypeError as e:
            raise ProfileError(f"bad device profile: {e}") from e


def pi_profile() -> DeviceProfile:
    return DeviceProfile(
        name="pi", machine="Raspberry Pi 4 Model B (4x Cortex-A72 @ 1.5 GHz), modelled",
        gflops=DEIT_B_FLOPS / PAPER_PI_DEIT_B_S / 1e9,
        gflops_source=("modelled: paper's mobile-only DeiT-B on the Pi, 5.06 x 407 ms = 2.059 s; "
                       "35.13 GFLOP / 2.059 s"),
        active_w=6.4, idle_w=2.7,
        power_source="published Pi 4B bare-board measurements (approx. 2.7 W idle, 6.4 W 4-core load); not measured here")


def is_raspberry_pi() -> bool:
    if platform.machine() not in ("aarch64", "armv7l", "arm64"):
        return False
    try:
        return "Raspberry Pi" in Path("/proc/device-tree/model").read_text(errors="ignore")
    except OSError:
        return False


# ----------------------------------------------------------------------------- measuring
def time_graph(path: str | Path, feeds: dict[str, np.ndarray], repeats: int = 10, warmup: int = 2,
               threads: int | None = None) -> float:
    """Median wall ms of one onnxruntime CPU run of a graph."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def image_feed(manifest: dict, batch: int = 1) -> dict[str, np.ndarray]:
    h, w = manifest["preprocess"]["size"]
    rng = np.random.default_rng(0)
    return {"images": rng.standard_normal((batch, 3, h, w)).astype(np.float32)}


def device_graphs(manifest: dict) -> list[str]:
    """The graph files a device runs: full.onnx and every head variant."""
    files = [manifest["full"]["file"]]
    for v in manifest["variants"]:
        for key in ("head", "head_int8", "head_tok8"):
            if v.get(key):
                files.append(v[key]["file"])
    return files


def measure_device(export_dir: str | Path, manifest: dict, flops: dict[str, int], name: str,
                   repeats: int = 10, progress=None) -> DeviceProfile:
    """Time full.onnx and the heads on this machine. Effective GFLOP/s from full.onnx."""
    export_dir = Path(export_dir)
    feeds = image_feed(manifest)
    graph_ms = {}
    for f in device_graphs(manifest):
        graph_ms[f] = time_graph(export_dir / f, feeds, repeats=repeats)
        if progress:
            progress(f, graph_ms[f])
    full = manifest["full"]["file"]
    gflops = flops[full] / (graph_ms[full] * 1e-3) / 1e9
    base = pi_profile()
    return DeviceProfile(
        name=name, machine=f"{platform.node()} {platform.machine()} ({platform.processor() or 'cpu'})",
        gflops=gflops, measured_gflops=True,
        gflops_source=f"measured: {full} ({flops[full] / 1e9:.3f} GFLOP) in {graph_ms[full]:.2f} ms median "
                      f"of {repeats} runs, batch 1, onnxruntime CPU",
        active_w=base.active_w, idle_w=base.idle_w,
        power_source="assumption: power not measured on this machine; the Pi 4B figures are used",
        graph_ms=graph_ms, model_id=manifest.get("model_id"))


def load_device_profile(spec: str) -> DeviceProfile:
    """`pi`, or a JSON file from `mercury-onnx profile`. (`host` needs an export folder to
    measure: see bench.resolve_device.)"""
    if spec == "pi":
        return pi_profile()
    path = Path(spec)
    if not path.exists():
        raise ProfileError(f"unknown device {spec!r}: use pi, host, or a profile JSON written by "
                           "`mercury-onnx profile`")
    try:
        return DeviceProfile.from_json(json.loads(path.read_text()))
    except ValueError as e:
        raise ProfileError(f"{path}: {e}") from e


# ----------------------------------------------------------------------------- cloud
@dataclass
class CloudProfile:
    name: str
    gflops: float | None               # modelled throughput, or None when measured
    source: str
    graph_ms: dict = field(default_factory=dict)

    def compute_ms(self, flops: float, graph: str | None = None) -> tuple[float, bool]:
        if graph is not None and graph in self.graph_ms:
            return float(self.graph_ms[graph]), True
        if self.gflops is None:
            raise ProfileError(f"cloud profile {self.name} has no time for {graph}")
        return flops / (self.gflops * 1e9) * 1e3, False


def rtx4090_cloud() -> CloudProfile:
    return CloudProfile("rtx4090", DEIT_B_FLOPS / (PAPER_4090_DEIT_B_MS * 1e-3) / 1e9,
                        "modelled: paper's 0.86 ms for DeiT-B (35.13 GFLOP) on an RTX 4090, scaled by FLOPs")
