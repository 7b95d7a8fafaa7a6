"""Run an export's heads with onnxruntime and compare two runs (x86_64 vs emulated aarch64).

Driven by tools/arm64_check.sh. Torch-free: `run` needs only the [edge] extra and runs the
device code itself (mercury_onnx.runtime.head), so it runs in the bare arm64 root.

  batch EXPORT_DIR IMAGES_DIR OUT.npy     preprocess real images into one fixed (B,3,H,W) batch (x86, Pillow)
  run EXPORT_DIR BATCH.npy OUT.npz        every head graph of every variant -> outputs + run facts
  compare X86.npz ARM.npz EXPORT_DIR      PASS/FAIL table; exit 1 on any mismatch
  edge-requirements PYPROJECT             the [edge] extra + core dependencies, one line

Where do x86 and aarch64 part? (tools/arm64_check.sh --probe):
  probe EXPORT_DIR OUT_DIR                every int8 head, and a copy of it whose integer activations (QuantizeLinear
                                          outputs), LayerNorm outputs and TopK scores are graph outputs (x86, needs onnx)
  tensors GRAPH_DIR BATCH.npy OUT.npz     every graph in GRAPH_DIR -> all its outputs (torch-free)
  compare-tensors X86.npz ARM.npz         per tensor, in graph order: how many values differ, by how much
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

KINDS = {"head": "fp32", "head_int8": "int8", "head_tok8": "tok8", "head_tok16": "tok16"}  # manifest key -> Head kind
FP32_ATOL = 1e-4  # fp32 head tokens, x86 vs aarch64
THREADS = 4  # a Pi 4 has 4 cores


def head_graphs(manifest: dict) -> list[tuple[dict, str, str]]:
    """(variant, manifest key, file) for every head graph the export has; a codec head's key is
    `codec_{D}x{B}` (export --codec)."""
    return ([(v, key, v[key]["file"]) for v in manifest["variants"] for key in KINDS if v.get(key)]
            + [(v, f"codec_{c['name']}", c["head"]["file"]) for v in manifest["variants"] for c in v.get("codecs") or []])


def make_batch(export_dir: Path, images_dir: Path, out: Path, n: int) -> None:
    """n real images, round-robin over the class folders in sorted order, preprocessed by the
    device's own preprocessing with the manifest's settings."""
    from mercury_onnx.formats.images import preprocess

    pre = json.loads((export_dir / "manifest.json").read_text())["preprocess"]
    classes = sorted(p for p in images_dir.iterdir() if p.is_dir()) or [images_dir]
    per_class = [sorted(f for f in c.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")) for c in classes]
    files = [fs[i] for i in range(n) for fs in per_class if i < len(fs)][:n]
    if len(files) < n:
        sys.exit(f"only {len(files)} images under {images_dir}, need {n}")
    batch = preprocess(files, pre)  # (B, 3, H, W) float32
    np.save(out, batch)
    print(f"batch: {len(files)} images from {images_dir} -> {batch.shape}")


def run_heads(export_dir: Path, batch_path: Path, out: Path) -> None:
    """Every head graph through the device's own runner (mercury_onnx.runtime.head.Head:
    sequential execution, no spinning) with a Pi's 4 intra-op threads."""
    import onnxruntime as ort

    from mercury_onnx.formats.manifest import load_manifest
    from mercury_onnx.runtime.head import Head

    t0 = time.perf_counter()
    manifest = load_manifest(export_dir, verify=True)  # sha256 of every file, on this machine too
    images = np.load(batch_path)  # (B, 3, H, W)
    arrays, runs = {}, []
    for v, key, file in head_graphs(manifest):
        if key.startswith("codec_"):
            head = Head(export_dir, v["keep_ratio"], threads=THREADS, manifest=manifest, codec=key[6:])
        else:
            head = Head(export_dir, v["keep_ratio"], KINDS[key], threads=THREADS, manifest=manifest)
        t = time.perf_counter()
        outputs = head(images)  # {"tokens", "indices"[, "scales"]} or {"codes", "indices"}
        runs.append({"keep_tokens": v["keep_tokens"], "kind": key, "file": file,
                     "seconds": time.perf_counter() - t})
        for name, value in outputs.items():
            arrays[f"k{v['keep_tokens']}/{key}/{name}"] = value
    facts = {
        "machine": platform.machine(), "onnxruntime": ort.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "model_id": manifest.get("model_id"),
        "images": int(images.shape[0]), "runs": runs, "total_seconds": time.perf_counter() - t0,
    }
    np.savez(out, __facts__=np.array(json.dumps(facts)), **arrays)
    print(f"{facts['machine']}: onnxruntime {facts['onnxruntime']}, {len(runs)} head graph(s) on "
          f"{facts['images']} images, {facts['total_seconds']:.1f} s wall"
          + (" (emulated: not a Pi latency)" if facts["machine"] == "aarch64" else ""))


def tail_top1(export_dir: Path, tail_file: str, tokens: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The cloud's prediction (x86 tail) from a head's outputs: (B,) class ids."""
    import onnxruntime as ort

    tail = ort.InferenceSession(str(export_dir / tail_file), providers=["CPUExecutionProvider"])
    return tail.run(["logits"], {"tokens": tokens.astype(np.float32), "indices": indices})[0].argmax(1)


def compare(x86_path: Path, arm_path: Path, export_dir: Path, lenient_int8: bool = False,
            json_out: Path | None = None) -> int:
    """fp32 head: equal indices, tokens within FP32_ATOL. tok8 head: equal indices, int8 tokens
    within one step, scales within FP32_ATOL/127. tok16 head: equal indices, fp16 tokens within
    FP32_ATOL + one fp16 ulp. Codec head: equal indices, uint8 codes within one step (a float
    that lands on a rounding boundary may round either way). int8 (QDQ) head: equal indices, and the cloud's top-1 from the ARM
    outputs agrees with x86 on >= the export's lossy bar (min_top1_lossy, 0.9); its tokens are
    reported (a float op that differs by an ulp can move one value across a rounding step).
    lenient_int8 only reports the int8 head's indices (for older S8S8 exports, whose int8 graph
    onnxruntime fuses differently on x86 and ARM: see mercury_onnx/export/quantize.py)."""
    from mercury_onnx.formats.manifest import load_manifest

    x86, arm = np.load(x86_path), np.load(arm_path)
    fx, fa = (json.loads(str(d["__facts__"])) for d in (x86, arm))
    manifest = load_manifest(export_dir, verify=True)
    min_top1 = manifest.get("validation", {}).get("tolerances", {}).get("min_top1_lossy", 0.9)
    problems = []
    if fa["machine"] != "aarch64":
        problems.append(f"the ARM run ran on {fa['machine']}, not aarch64")
    if fx["onnxruntime"] != fa["onnxruntime"]:
        problems.append(f"onnxruntime versions differ: x86 {fx['onnxruntime']}, arm {fa['onnxruntime']}")
    if fx["model_id"] != manifest.get("model_id"):
        problems.append(f"the x86 run is of another export (model_id {fx['model_id']})")
    keys = sorted(k for k in x86.files if k != "__facts__")
    if sorted(k for k in arm.files if k != "__facts__") != keys:
        problems.append("the two runs produced different outputs")
    graphs = sorted({k.rsplit("/", 1)[0] for k in keys})
    expected = sorted(f"k{v['keep_tokens']}/{key}" for v, key, _ in head_graphs(manifest))
    if graphs != expected:
        problems.append(f"the runs cover head graphs {graphs}, the export has {expected}")
    tails = {f"k{v['keep_tokens']}": v["tail"]["file"] for v in manifest["variants"]}

    print(f"x86_64 onnxruntime {fx['onnxruntime']} vs aarch64 onnxruntime {fa['onnxruntime']} "
          f"(QEMU cortex-a72), {fx['images']} real images")
    print(f"{'variant':8} {'graph':10} {'output':8} {'x86 vs arm64':>34} {'rule':>12}  result")

    table = []

    def row(tag, kind, name, diff, rule, ok):
        print(f"{tag:8} {kind:10} {name:8} {diff:>34} {rule:>12}  {'PASS' if ok else 'FAIL'}")
        table.append([tag, kind, name, diff, rule, "PASS" if ok else "FAIL"])
        if not ok:
            problems.append(f"{tag} {kind} {name}: {diff} (rule: {rule})")

    for key in keys:
        if key not in arm.files:
            continue
        tag, kind, name = key.split("/")
        a, b = x86[key], arm[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            row(tag, kind, name, f"{a.shape}{a.dtype} vs {b.shape}{b.dtype}", "same shape", False)
        elif name == "indices":
            rows = int((a != b).any(axis=1).sum())
            gated = kind != "head_int8" or not lenient_int8
            row(tag, kind, name, f"{rows} of {len(a)} rows differ", "equal" if gated else "reported",
                rows == 0 or not gated)
        elif kind.startswith("codec_") and name == "codes":  # codec codes: rounding may move one step
            d = int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())
            n = int((a != b).sum())
            row(tag, kind, name, f"{d} step(s), {n} of {a.size} differ", "<= 1 step", d <= 1)
        elif kind == "head_tok8" and name == "tokens":  # int8 wire tokens: rounding may move one step
            d = int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())
            row(tag, kind, name, f"{d} int8 step(s)", "<= 1 step", d <= 1)
        elif kind == "head_tok16" and name == "tokens":  # fp16 wire tokens: fp32 atol + one fp16 ulp
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            ulp = np.spacing(np.abs(a)).astype(np.float64)
            row(tag, kind, name, f"max|diff| {diff.max():.3g}", "<= 1e-4 + 1 ulp",
                bool((diff <= FP32_ATOL + ulp).all()))
        else:
            d = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
            if kind == "head":
                row(tag, kind, name, f"max|diff| {d:.3g}", f"<= {FP32_ATOL:g}", d <= FP32_ATOL)
            elif kind == "head_tok8":  # scales = max|token| / 127
                row(tag, kind, name, f"max|diff| {d:.3g}", f"<= {FP32_ATOL / 127:.2g}", d <= FP32_ATOL / 127)
            else:  # int8 head tokens: only rows that kept the same tokens are comparable
                same = (x86[f"{tag}/{kind}/indices"] == arm[f"{tag}/{kind}/indices"]).all(axis=1)
                d = float(np.abs(a[same].astype(np.float64) - b[same].astype(np.float64)).max(initial=0))
                row(tag, kind, name, f"max|diff| {d:.3g} (same-index rows)", "reported", True)
        if kind == "head_int8" and name == "tokens" and f"{tag}/{kind}/indices" in arm.files:
            idx = f"{tag}/{kind}/indices"
            px = tail_top1(export_dir, tails[tag], a, x86[idx])
            pa = tail_top1(export_dir, tails[tag], b, arm[idx])
            agree = float((px == pa).mean())
            row(tag, kind, "top-1", f"{agree:.3f} agree ({int((px != pa).sum())} differ)",
                f">= {min_top1:g}", agree >= min_top1)
    emulated = sum(r["seconds"] for r in fa["runs"])
    print(f"emulated aarch64 run: {emulated:.1f} s in the heads, {fa['total_seconds']:.1f} s in all "
          "(QEMU: says nothing about a Pi's latency)")
    if json_out is not None:   # docs/results/edge.json: rendered by benchmarks/tables.py (`rows`)
        json_out.write_text(json.dumps({
            "x86_64": fx["onnxruntime"], "aarch64": fa["onnxruntime"], "images": fx["images"],
            "model_id": fx["model_id"], "emulated_head_seconds": round(emulated, 1), "problems": problems,
            "table": {"columns": ["variant", "graph", "output", "x86 vs arm64", "rule", "result"],
                      "align": ["---"] * 6, "rows": table}}, indent=1) + "\n")
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print(f"PASS: {len(graphs)} head graph(s) agree between x86_64 and aarch64 onnxruntime")
    return 0


PROBE = ".probe.onnx"


def probe_graphs(export_dir: Path, out: Path) -> None:
    """The int8 heads as they are, and as probes: their intermediate tensors as extra outputs
    (integer activations, LayerNorm outputs, the scores TopK ranks).
    Extra outputs can stop onnxruntime fusing a node; compare-tensors checks that each probe's
    tokens and indices still equal its head's on the same machine."""
    import shutil

    import onnx

    from mercury_onnx.formats.manifest import load_manifest

    out.mkdir(parents=True, exist_ok=True)
    for v in load_manifest(export_dir)["variants"]:
        if not v.get("head_int8"):
            continue
        file = v["head_int8"]["file"]
        shutil.copy(export_dir / file, out / file)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(export_dir / file)))
        types = {t.name: t for t in model.graph.value_info}
        weights = {t.name for t in model.graph.initializer}
        have = {o.name for o in model.graph.output}
        for n in model.graph.node:
            activation = n.op_type == "QuantizeLinear" and n.input[0] not in weights
            name = n.input[0] if n.op_type == "TopK" else n.output[0]  # TopK: the scores it ranks
            if (activation or n.op_type in ("LayerNormalization", "TopK")) and name not in have:
                model.graph.output.append(types.get(name) or onnx.ValueInfoProto(name=name))
                have.add(name)
        onnx.save(model, str(out / file.replace(".onnx", PROBE)))
        print(f"{file}: {len(model.graph.output) - 2} intermediate tensors as outputs")


def run_tensors(graph_dir: Path, batch_path: Path, out: Path) -> None:
    """Every graph of graph_dir on the batch (device session, 4 threads): all outputs."""
    from mercury_onnx.runtime.head import device_session

    images = np.load(batch_path)  # (B, 3, H, W)
    arrays = {}
    for f in sorted(graph_dir.glob("*.onnx")):
        sess = device_session(f, THREADS)
        for o, value in zip(sess.get_outputs(), sess.run(None, {"images": images})):
            arrays[f"{f.name}|{o.name}"] = value
    np.savez(out, __machine__=np.array(platform.machine()), **arrays)
    print(f"{platform.machine()}: {len(arrays)} tensors of {len(list(graph_dir.glob('*.onnx')))} graphs")


def compare_tensors(x86_path: Path, arm_path: Path) -> None:
    x86, arm = np.load(x86_path), np.load(arm_path)
    for probe in sorted({k.split("|")[0] for k in x86.files if PROBE in k}):
        head = probe.replace(PROBE, ".onnx")
        print(f"{head}  (x86_64 vs aarch64; integer tensors in steps of their scale)")
        for side, run in (("x86_64", x86), ("aarch64", arm)):
            faithful = all(np.array_equal(run[f"{probe}|{o}"], run[f"{head}|{o}"]) for o in ("tokens", "indices"))
            print(f"  probe on {side}: {'same outputs as the head' if faithful else 'OTHER outputs than the head (fused otherwise)'}")
        for key in [k for k in x86.files if k.startswith(probe + "|")]:
            a, b = x86[key], arm[key]
            name = key.split("|")[1]
            if name == "indices":
                print(f"  {name:64} {int((a != b).any(axis=1).sum())} of {len(a)} rows differ")
            elif a.dtype.kind in "iu":
                d = np.abs(a.astype(np.int64) - b.astype(np.int64))
                print(f"  {name[-64:]:64} {int((d > 0).sum()):8d} of {d.size} differ, max {int(d.max())} step(s)")
            else:
                d = np.where(a == b, 0, np.abs(a.astype(np.float64) - b.astype(np.float64)))  # equal infs: 0
                finite = np.abs(a[np.isfinite(a)])
                print(f"  {name[-64:]:64} float, max|diff| {d.max():.3g} (max|x| {finite.max(initial=0):.3g})")


def edge_requirements(pyproject: Path) -> str:
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    return " ".join(project["dependencies"] + project["optional-dependencies"]["edge"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("batch")
    b.add_argument("export_dir", type=Path); b.add_argument("images_dir", type=Path)
    b.add_argument("out", type=Path); b.add_argument("--n", type=int, default=32)
    r = sub.add_parser("run")
    r.add_argument("export_dir", type=Path); r.add_argument("batch", type=Path); r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("x86", type=Path); c.add_argument("arm", type=Path); c.add_argument("export_dir", type=Path)
    c.add_argument("--lenient-int8", action="store_true", help="int8 (QDQ) heads: report unequal indices, do not fail")
    c.add_argument("--json", type=Path, default=None, help="also write the comparison table as JSON")
    e = sub.add_parser("edge-requirements")
    e.add_argument("pyproject", type=Path)
    pr = sub.add_parser("probe")
    pr.add_argument("export_dir", type=Path); pr.add_argument("out", type=Path)
    t = sub.add_parser("tensors")
    t.add_argument("graph_dir", type=Path); t.add_argument("batch", type=Path); t.add_argument("out", type=Path)
    ct = sub.add_parser("compare-tensors")
    ct.add_argument("x86", type=Path); ct.add_argument("arm", type=Path)
    a = p.parse_args()
    if a.cmd == "batch":
        make_batch(a.export_dir, a.images_dir, a.out, a.n)
    elif a.cmd == "run":
        run_heads(a.export_dir, a.batch, a.out)
    elif a.cmd == "compare":
        sys.exit(compare(a.x86, a.arm, a.export_dir, a.lenient_int8, a.json))
    elif a.cmd == "probe":
        probe_graphs(a.export_dir, a.out)
    elif a.cmd == "tensors":
        run_tensors(a.graph_dir, a.batch, a.out)
    elif a.cmd == "compare-tensors":
        compare_tensors(a.x86, a.arm)
    else:
        print(edge_requirements(a.pyproject))


if __name__ == "__main__":
    main()
