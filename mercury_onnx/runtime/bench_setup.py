"""bench, part 1: the model the bench runs (from an export folder, or a timm name alone), its
graphs' FLOPs, and the device and cloud profiles the --device/--cloud options name.

numpy + onnxruntime; no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import vit_flops as VF
from ..formats.manifest import load_manifest

JANUS_BLOCKS = 3


class BenchError(ValueError):
    """Bad bench input; the message says what to change."""


@dataclass
class ModelSetup:
    """What the bench needs to know about the model: geometry, variants, graph files."""
    label: str
    geom: VF.VitGeometry
    input_size: tuple[int, int]
    prune_after: int
    split: int
    keep_tokens: list[int]
    model_id: str | None = None
    export_dir: Path | None = None
    manifest: dict | None = None
    prune_point: str = "block"
    score_proxy_rank: int = 0         # prune point attn: the head's score proxy (its FLOPs count)

    @property
    def keep_ratios(self) -> list[float]:
        return [k / self.geom.num_patches for k in self.keep_tokens]

    def codecs(self, k: int) -> list[dict]:
        """The manifest's codec entries of the variant with K kept tokens (none without an export)."""
        if self.manifest is None:
            return []
        v = next(v for v in self.manifest["variants"] if v["keep_tokens"] == k)
        return list(v.get("codecs") or [])

    def files(self, k: int) -> dict:
        """Graph files of the variant with K kept tokens (empty without an export)."""
        if self.manifest is None:
            return {}
        v = next(v for v in self.manifest["variants"] if v["keep_tokens"] == k)
        return {key: v[key]["file"] for key in ("head", "head_tok8", "head_tok16", "tail") if v.get(key)}


def setup_from_export(export_dir: str | Path, verify: bool = True) -> ModelSetup:
    m = load_manifest(export_dir, verify=verify)
    g = VF.VitGeometry.from_manifest(m)
    label = m["timm_model"] + (f" {m['overrides']}" if m.get("overrides") else "")
    label += ", prune point attn" if m.get("prune_point") == "attn" else ""
    return ModelSetup(label=label, geom=g, input_size=tuple(m["preprocess"]["size"]),
                      prune_after=int(m.get("prune_after_block", 1)),
                      split=int(m.get("split_after_block", m.get("prune_after_block", 1))),
                      keep_tokens=[int(v["keep_tokens"]) for v in m["variants"]],
                      model_id=m.get("model_id"), export_dir=Path(export_dir), manifest=m,
                      prune_point=m.get("prune_point", "block"),
                      score_proxy_rank=int((m.get("score_proxy") or {}).get("rank", 0)))


def setup_from_name(name: str, keep_ratios: list[float], img_size: int | None = None,
                    patch_size: int | None = None, num_classes: int = 1000,
                    prune_point: str = "block") -> ModelSetup:
    """A timm name alone (no export): everything is modelled from its FLOPs."""
    if prune_point not in ("block", "attn"):
        raise BenchError(f"--prune-point {prune_point!r}: choose block or attn")
    try:
        g = VF.VitGeometry.from_timm_name(name, img_size, patch_size, num_classes)
    except ValueError as e:
        raise BenchError(str(e)) from e
    side = int(round(g.num_patches ** 0.5)) * g.patch_size
    ks = [max(1, int(round(r * g.num_patches))) for r in keep_ratios]
    return ModelSetup(label=f"{name} (no export: modelled{', prune point attn' if prune_point == 'attn' else ''})", geom=g, input_size=(side, side),
                      prune_after=1, split=1, keep_tokens=ks, prune_point=prune_point,
                      score_proxy_rank=VF.SCORE_PROXY_RANK if prune_point == "attn" else 0)


def graph_flops(s: ModelSetup) -> dict:
    """Analytic FLOPs per graph (the manifest carries none): 'full', ('head', K), ('tail', K),
    ('janus_head', K), ('janus_tail', K); plus the export's file names for measured lookups."""
    g = s.geom
    out: dict = {"full": VF.vanilla_flops(g)}
    for k in s.keep_tokens:
        out[("head", k)] = VF.head_flops(g, s.split, prune_point=s.prune_point, keep=k,
                                         score_proxy_rank=s.score_proxy_rank)
        out[("tail", k)] = VF.tail_flops(g, s.split)
        jsplit = min(g.depth, s.prune_after + JANUS_BLOCKS - 1)
        out[("janus_head", k)] = VF.head_flops(g, jsplit, VF.janus_schedule(g.num_patches, k, JANUS_BLOCKS))
        out[("janus_tail", k)] = VF.tail_flops(g, jsplit)
    if s.manifest is not None:
        out[s.manifest["full"]["file"]] = out["full"]
        for k in s.keep_tokens:
            for key, f in s.files(k).items():
                out[f] = out[("tail", k)] if key == "tail" else out[("head", k)]
    return out


def resolve_device(spec: str, setup, progress=print):
    """pi | host | FILE.json -> DeviceProfile. `host`, and `pi` when running on a Raspberry Pi,
    measure the export's graphs on this machine."""
    from .profiles import is_raspberry_pi, load_device_profile, measure_device

    measure = spec == "host" or (spec == "pi" and is_raspberry_pi())
    if not measure:
        return load_device_profile(spec)
    if setup.export_dir is None:
        raise BenchError(f"--device {spec} measures the exported graphs on this machine: give an EXPORT_DIR")
    progress(f"measuring the device graphs on this machine ({spec})")
    return measure_device(setup.export_dir, setup.manifest, graph_flops(setup), spec,
                          progress=lambda f, ms: progress(f"  {f}: {ms:.2f} ms"))


def resolve_cloud(spec: str, server: str | None, setup, progress=print):
    """rtx4090 (modelled) | local (ORT CPU here); --server times each tail on serve-tail."""
    import numpy as np

    from .profiles import CloudProfile, rtx4090_cloud, time_graph

    if spec == "rtx4090":
        cloud = rtx4090_cloud()
    elif spec == "local":
        if setup.export_dir is None:
            raise BenchError("--cloud local measures the exported tail graphs: give an EXPORT_DIR")
        m, ms = setup.manifest, {}
        progress("measuring the cloud graphs on this machine (onnxruntime CPU)")
        from .profiles import image_feed
        ms[m["full"]["file"]] = time_graph(setup.export_dir / m["full"]["file"], image_feed(m))
        for v in m["variants"]:
            k, d, p = v["keep_tokens"], m["dim"], m.get("num_prefix_tokens", 1)
            feeds = {"tokens": np.random.default_rng(0).standard_normal((1, p + k, d)).astype(np.float32),
                     "indices": np.arange(k, dtype=np.int64)[None] * (m["num_patches"] // k)}
            ms[v["tail"]["file"]] = time_graph(setup.export_dir / v["tail"]["file"], feeds)
            for c in v.get("codecs", []):   # codec tails: codes (1, P+K, d) uint8 at mid-range
                codes = np.full((1, p + k, c["dims"]), 2 ** (c["bits"] - 1), np.uint8)
                ms[c["tail"]["file"]] = time_graph(setup.export_dir / c["tail"]["file"],
                                                   {"codes": codes, "indices": feeds["indices"]})
        full_flops = graph_flops(setup)["full"]
        cloud = CloudProfile("local", full_flops / (ms[m["full"]["file"]] * 1e-3) / 1e9,
                             "measured: onnxruntime CPU on this machine, batch 1, median; graphs not "
                             "exported (janus-like) scaled by FLOPs from full.onnx's time (modelled)", ms)
    else:
        raise BenchError(f"unknown --cloud {spec!r}: use rtx4090 (modelled) or local (measured here)")
    if server:
        if setup.export_dir is None:
            raise BenchError("--server needs an EXPORT_DIR (the tails it serves)")
        from .client import KServeClient
        from .tail import model_name
        import time
        c = KServeClient(server, timeout=10.0)
        if not c.ready():
            raise BenchError(f"serve-tail at {server} is not ready")
        m = setup.manifest
        for v in m["variants"]:
            k, d, p = v["keep_tokens"], m["dim"], m.get("num_prefix_tokens", 1)
            inputs = {"tokens": np.zeros((1, p + k, d), np.float32),
                      "indices": (np.arange(k, dtype=np.int64) * (m["num_patches"] // k))[None]}
            times = []
            for i in range(12):
                t = time.perf_counter()
                c.infer(model_name(k), inputs, {"model_id": m.get("model_id")})
                if i >= 2:
                    times.append((time.perf_counter() - t) * 1e3)
            cloud.graph_ms[v["tail"]["file"]] = float(np.median(times))
        cloud.source += (f"; tails measured as serve-tail round trips on {server} (includes the local HTTP hop)"
                         + ("; codec tails in onnxruntime here (no HTTP hop)" if spec == "local" else ""))
        c.close()
    return cloud
