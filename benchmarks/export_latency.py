"""Latency of the exported graphs on CPU: head ONNX vs torch eager, the pruning's share of
the head, and the tail vs a vanilla tail (the same blocks on 1+N tokens, no reconstruction).

    .venv/bin/python benchmarks/export_latency.py [--models deit_tiny_patch16_224 ...] [--reps 40]
        [--head-reps 800] [--threads 1] [--keep-ratio 0.5] [--profile] [--json docs/results/export_latency.json]

The graphs being compared are timed interleaved (a round of A, B, C, ..., in a new random order
each round) at batch 1 with one thread, as process CPU time (time.process_time): the machine
is shared, and wall time would count the time other processes hold the cores. Medians are
reported; the pruning and the tail ratio are paired round by round (see `paired`).
Random weights for the 224 models (latency does not depend on their values), made trained-like
(`trained_like`: non-zero biases, so the graph has the ops a trained checkpoint's has); the
reference model is ../shared/models/deit_tiny_patch4_32_cifar10.json.
Targets: head ONNX <= 0.85x torch eager; pruning <= 3% of the head; tail <= 1.02x vanilla tail.
The pruning's kernels are counted in onnxruntime's optimised graphs (head minus head without
pruning); --profile adds onnxruntime's per-kernel profile of the head's pruning kernels.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mercury_onnx.export import graphs as G  # noqa: E402
from mercury_onnx.export.convert import export_onnx  # noqa: E402
from mercury_onnx.export.validate import session  # noqa: E402
from mercury_onnx.models.checkpoint import mercury_from_any  # noqa: E402

REF = ROOT.parent / "shared" / "models" / "deit_tiny_patch4_32_cifar10.json"
KEEP_FROM = "<!-- kept on rerun: hand-written notes below -->"
DEFAULT_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", str(REF)]


def trained_like(mercury, seed: int = 0) -> None:
    """In place: small random values for every bias and norm affine of a randomly initialised
    backbone, as training leaves them. timm initialises each bias to 0 and each norm to weight 1,
    bias 0, and the exporter drops an add of zeros: such a head has no bias adds (a Linear becomes
    a bare MatMul where a trained checkpoint's is a Gemm or MatMul + Add), a graph no trained model
    exports, and it timed faster than the trained-like one (docs/results/prune_point.md). Backbones
    loaded from a checkpoint or the hub are left as they are."""
    if mercury.cfg.checkpoint is not None or mercury.cfg.pretrained:
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mercury.backbone.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.02 * torch.randn(p.shape, generator=g))


class HeadNoPrune(nn.Module):
    """The head's blocks without scoring/selection/gather: (B,3,H,W) -> (B,P+N,D)."""

    def __init__(self, mercury):
        super().__init__()
        self.m = mercury

    def forward(self, images):
        x = self.m.embed(images)
        for blk in self.m.backbone.blocks[: self.m.split]:
            x = blk(x)
        return x


class VanillaTail(nn.Module):
    """The tail's blocks on all P+N tokens as the unsplit model runs them: no reconstruction."""

    def __init__(self, mercury):
        super().__init__()
        self.m = mercury

    def forward(self, tokens):
        b = self.m.backbone
        x = tokens
        for blk in b.blocks[self.m.split:]:
            x = blk(x)
        return b.forward_head(b.norm(x))


def interleaved(fns: dict, reps: int, warmup: int = 2, seed: int = 0, warm: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each fn, one list per fn, timed round-robin in a new random order
    every round: whatever runs right after another job finds cold caches, and a fixed order
    would always hand that to the same fn (with torch in the loop, it made the head look
    ~0.3 ms slower than the head without pruning that ran after it). Round i of every list is
    the same round, so A[i] - B[i] and A[i] / B[i] are paired: slow drifts of a shared machine
    (minutes of other load) cancel, where a ratio of two medians keeps them. warm=K (>= 2): in
    its turn each fn runs K times in a row and the mean of the last K - 1 counts (warm caches)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    order, rng = list(fns), random.Random(seed)
    times = {k: [] for k in fns}
    timed = max(warm - 1, 1)                                     # calls timed per fn and round
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            if warm:
                fns[k]()
            t = time.process_time()
            for _ in range(timed):
                fns[k]()
            times[k].append((time.process_time() - t) / timed)
    return times


def paired(a: list[float], b: list[float], fn, blocks: int = 4) -> tuple[float, float, float]:
    """median over rounds of fn(a[i], b[i]), and its range over `blocks` consecutive blocks."""
    vals = [fn(x, y) for x, y in zip(a, b)]
    size = len(vals) // blocks
    per_block = [statistics.median(vals[i * size:(i + 1) * size]) for i in range(blocks)]
    return statistics.median(vals), min(per_block), max(per_block)


def optimised_nodes(path: Path, threads: int = 1):
    """The nodes of onnxruntime's optimised graph of `path` (its kernels, by name), in execution
    order; the graph is written beside it as .opt.onnx."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath).graph.node


def pruning_kernels(path: Path, threads: int) -> list[str]:
    """Names of the kernels onnxruntime runs for the head's pruning: the nodes of its optimised
    graph that the block output (the tensor the kept tokens are gathered from) does not need."""
    nodes = optimised_nodes(path, threads)
    producer = {o: n for n in nodes for o in n.output}
    gather = producer["tokens"]
    assert gather.op_type.startswith("Gather"), f"tokens come from {gather.op_type}, not a gather"
    needed, todo = set(), [gather.input[0]]
    while todo:
        t = todo.pop()
        if t in producer and producer[t].name not in needed:
            needed.add(producer[t].name)
            todo += list(producer[t].input)
    return [n.name for n in nodes if n.name not in needed]


def profile_kernels(path: Path, x, names: set[str], threads: int, runs: int = 200) -> list[tuple[str, str, float]]:
    """onnxruntime's profiler on `path`: (name, op, median us) of the kernels in `names`, in
    execution order. The profiler adds its own few us to every kernel."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    so.enable_profiling, so.profile_file_prefix = True, str(path.with_suffix(""))
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, {"images": x})
    durations, ops = collections.defaultdict(list), {}
    for e in json.loads(Path(s.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["name"][:-12] in names:
            durations[e["name"][:-12]].append(e["dur"])
            ops[e["name"][:-12]] = e["args"]["op_name"]
    return [(n, ops[n], statistics.median(d)) for n, d in durations.items()]


def bench_model(source: str, keep_ratio: float, reps: int, head_reps: int, threads: int, tmp: Path,
                profile: bool = False) -> dict:
    m = mercury_from_any(source, keep_ratios=[keep_ratio])[0]
    trained_like(m)
    h, w = m.backbone.patch_embed.img_size
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        tok, idx = m.forward_head(x)
        full_tokens = HeadNoPrune(m)(x)
    name = Path(source).stem
    files = {k: tmp / f"{name}_{k}.onnx" for k in ("head", "head_noprune", "tail", "vanilla_tail")}
    export_onnx(G.HeadGraph(m), (x,), files["head"], *G.HEAD_IO)
    export_onnx(HeadNoPrune(m), (x,), files["head_noprune"], ["images"], ["tokens"])
    export_onnx(G.TailGraph(m), (tok, idx), files["tail"], *G.TAIL_IO)
    export_onnx(VanillaTail(m), (full_tokens,), files["vanilla_tail"], ["tokens"], ["logits"])
    s = {k: session(f, threads) for k, f in files.items()}
    xn, tokn, idxn, fulln = x.numpy(), tok.numpy(), idx.numpy(), full_tokens.numpy()

    def torch_head():
        with torch.no_grad():
            m.forward_head(x)

    pruning = pruning_kernels(files["head"], threads)
    heads = {
        "torch_head": torch_head,
        "onnx_head": lambda: s["head"].run(None, {"images": xn}),
        "onnx_head_noprune": lambda: s["head_noprune"].run(None, {"images": xn}),
    }
    times = interleaved(heads, head_reps)
    head = {k: statistics.median(v) for k, v in times.items()}
    extra, lo, hi = paired(times["onnx_head"], times["onnx_head_noprune"], lambda a, b: a - b)
    tails = interleaved({
        "onnx_tail": lambda: s["tail"].run(None, {"tokens": tokn, "indices": idxn}),
        "onnx_vanilla_tail": lambda: s["vanilla_tail"].run(None, {"tokens": fulln}),
    }, reps)
    tail = {k: statistics.median(v) for k, v in tails.items()}
    ratio, rlo, rhi = paired(tails["onnx_tail"], tails["onnx_vanilla_tail"], lambda a, b: a / b)
    return {"model": name, "img": h, "N": m.num_patches, "K": m.keep, "D": m.dim,
            **head, **tail,
            "pruning_kernels": len(pruning),
            "profile": profile_kernels(files["head"], xn, set(pruning), threads) if profile else None,
            "head_onnx_vs_torch": head["onnx_head"] / head["torch_head"],
            "pruning_us": 1e6 * extra,
            "pruning_share": extra / head["onnx_head"],
            "pruning_share_blocks": (lo / head["onnx_head"], hi / head["onnx_head"]),
            "tail_vs_vanilla": ratio, "tail_vs_vanilla_blocks": (rlo, rhi)}


def table(rows: list[dict]) -> dict:
    """The latency table as {"columns", "rows"} of formatted cells (benchmarks/tables.py `rows`)."""
    ms = lambda s: f"{1e3 * s:.2f}"   # noqa: E731
    ok = lambda v, t: "yes" if v <= t else "**no**"   # noqa: E731
    out = []
    for r in rows:
        lo, hi = r["pruning_share_blocks"]
        tlo, thi = r["tail_vs_vanilla_blocks"]
        out.append([f"{r['model']} ({r['img']}px)", f"{r['N']}→{r['K']}", ms(r['torch_head']), ms(r['onnx_head']),
                    f"{r['head_onnx_vs_torch']:.2f} {ok(r['head_onnx_vs_torch'], 0.85)}", ms(r['onnx_head_noprune']),
                    f"{r['pruning_us']:.0f}", f"{100 * r['pruning_share']:.1f}% {ok(r['pruning_share'], 0.03)} "
                    f"({100 * lo:.1f}–{100 * hi:.1f})", str(r['pruning_kernels']),
                    f"{r['pruning_us'] / max(r['pruning_kernels'], 1):.1f}", ms(r['onnx_tail']),
                    ms(r['onnx_vanilla_tail']), f"{r['tail_vs_vanilla']:.3f} {ok(r['tail_vs_vanilla'], 1.02)} "
                    f"({tlo:.3f}–{thi:.3f})"])
    return {"columns": ["model", "N→K", "torch head ms", "ONNX head ms", "ONNX/torch (≤0.85)", "head w/o pruning ms",
                        "pruning µs", "pruning share (≤3%)", "pruning kernels", "µs per pruning kernel", "tail ms",
                        "vanilla tail ms", "tail/vanilla (≤1.02)"],
            "align": ["---"] * 13, "rows": out}


def to_markdown(rows: list[dict], args, cmd: str) -> str:
    lines = [
        "# Export latency (issue 4)", "",
        f"Command: `{cmd}`  ",
        f"Machine: 2-core x86_64 CPU, shared with other jobs, no GPU ({platform.processor() or platform.machine()}); "
        f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}; "
        f"{args.threads} thread(s) for torch and ORT, batch 1, keep ratio {args.keep_ratio}, "
        f"process CPU time; {args.head_reps} interleaved rounds for the heads and {args.reps} for the tails. "
        "Pruning = median over rounds of (head - head w/o pruning) in the same round; tail/vanilla = median "
        "over rounds of the same-round ratio (paired: the machine's slow drifts cancel); in brackets the "
        "range of that median over 4 consecutive blocks of rounds. "
        "All figures measured; "
        "224 models have random weights, trained-like (non-zero biases: the graph a trained checkpoint exports).", "",
    ]
    t = table(rows)
    lines += ["| " + " | ".join(t["columns"]) + " |", "|" + "|".join(["---"] * len(t["columns"])) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in t["rows"]]
    lines += ["", "Head without pruning = the same patch embedding and blocks exported without scoring, "
              "region ArgMin, TopK and Gather; pruning share = pruning µs / ONNX head. "
              "Pruning kernels = nodes of onnxruntime's optimised head graph that the block output does not "
              "need (scoring, selection, gather); µs per pruning kernel = pruning µs / pruning kernels. "
              "Vanilla tail = the same blocks + norm + classifier on 1+N tokens with no reconstruction "
              "(what the unsplit model runs after the split point).", ""]
    for r in rows:
        if r.get("profile"):
            total = sum(us for _, _, us in r["profile"])
            lines += [f"Per-kernel profile of the pruning in the {r['model']} head (onnxruntime profiler, median of "
                      f"200 runs; the profiler adds a few µs to every kernel): {len(r['profile'])} kernels, "
                      f"{total:.0f} µs in all, in execution order:", "",
                      " · ".join(f"{op} {us:.0f}" for _, op, us in r["profile"]), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=40, help="tail rounds")
    ap.add_argument("--head-reps", type=int, default=800, help="head rounds")
    ap.add_argument("--threads", type=int, default=1, help="1 = CPU time is the latency")
    ap.add_argument("--profile", action="store_true", help="per-kernel profile of the pruning (onnxruntime profiler)")
    ap.add_argument("--out", default="", help="also write this Markdown report")
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "export_latency.json"),
                    help="raw results + the table (docs/results/export.md, made by reproduce.sh export, renders it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in args.models:
            r = bench_model(src, args.keep_ratio, args.reps, args.head_reps, args.threads, Path(tmp), args.profile)
            rows.append(r)
            print(f"{r['model']}: head ONNX/torch {r['head_onnx_vs_torch']:.2f}, pruning "
                  f"{100 * r['pruning_share']:.1f}% of head ({r['pruning_us']:.0f} us, {r['pruning_kernels']} kernels; blocks "
                  f"{100 * r['pruning_share_blocks'][0]:.1f}-{100 * r['pruning_share_blocks'][1]:.1f}%), tail/vanilla {r['tail_vs_vanilla']:.3f} "
                  f"(ms: torch head {1e3 * r['torch_head']:.2f}, onnx head {1e3 * r['onnx_head']:.2f}, "
                  f"tail {1e3 * r['onnx_tail']:.2f}, vanilla tail {1e3 * r['onnx_vanilla_tail']:.2f})", flush=True)
            for f in Path(tmp).glob("*"):
                f.unlink()
    cmd = "python benchmarks/export_latency.py " + " ".join(sys.argv[1:])
    md = to_markdown(rows, args, cmd.strip())
    if args.json:
        import os
        Path(args.json).write_text(json.dumps({
            "command": cmd.strip(), "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at the end", "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "threads": args.threads,
            "keep_ratio": args.keep_ratio, "head_reps": args.head_reps, "reps": args.reps,
            "results": rows, "table": table(rows)}, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        kept = ""   # the hand-written sections after the latency table survive a rerun
        if out.exists() and KEEP_FROM in out.read_text():
            kept = out.read_text()[out.read_text().index(KEEP_FROM):]
        out.write_text(md + ("\n" + kept if kept else ""))
        print(f"wrote {args.out}")
    print(md)


if __name__ == "__main__":
    main()
