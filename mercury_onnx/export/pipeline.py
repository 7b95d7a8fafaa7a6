"""export_model: a Mercury model -> a validated export folder (docs/FORMAT.md).

    export_model("deit.json", "export/", [0.5, 0.25], token_dtypes=["int8"], int8_head=True)
    export_model(ckpt, "export/", [0.25], ExportOptions(validate_images=256, log=None))

Steps: build the Mercury wrappers (checkpoint, backbone JSON or timm name) -> export
full / head / tail graphs (+ optional tok8 / tok16 heads, int8 head, fp16 tail) into a
temporary folder beside OUT_DIR -> validate ORT against torch on real images -> write
manifest.json -> rename the folder to OUT_DIR. A failed validation deletes the temporary
folder and raises ValidationFailed, so OUT_DIR never looks like a valid export it is not
(an older export already there is left untouched). `model_id` is the 16-hex-char hash that
ties a head to its tail.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import graphs as G
from .convert import ExportError, check_static_head, export_onnx, op_counts
from .images import load_images
from ..formats.manifest import MANIFEST, write_manifest
from .validate import Tolerances, validate_export

CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"
TOKEN_DTYPES = ("int8", "fp16")


class ValidationFailed(ExportError):
    """ORT and torch disagree beyond the tolerances; `report` holds the numbers."""

    def __init__(self, report: dict):
        self.report = report
        super().__init__("validation failed:\n  " + "\n  ".join(report["failures"]))


def model_id(models) -> str:
    """16 hex chars: sha256 of the config JSON and every weight (backbone + meta-parameters)."""
    h = hashlib.sha256()
    cfg = models[0].cfg.to_dict()
    cfg.update(keep_ratio=None, keep_tokens=None, checkpoint=None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    tensors = {f"backbone.{k}": v for k, v in models[0].backbone.state_dict().items()}
    for m in models:
        tensors.update({f"meta.{m.keep}.{k}": v for k, v in m.recon.state_dict().items()})
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class ExportOptions:
    """What export_model writes beside the fp32 head/tail pairs, and how it checks them."""
    opset: int = 17                                 # raised to 18 with dynamo (its lowest)
    token_dtypes: Sequence[str] = ()                # extra heads: "int8" (+ per-token scales), "fp16"
    int8_head: bool = False                         # QDQ int8 head, calibrated on calib_data
    fp16_tail: bool = False                         # fp16 tail for CUDA
    calib_data: str | Path | None = None            # default CIFAR-10 train
    calib_images: int = 128
    int8_select_images: int = 256                   # held out: per-channel vs per-tensor weight scales
    validate_data: str | Path | None = None         # default CIFAR-10 test: real images ORT is checked on
    validate_images: int = 64
    triton_repo: str | Path | None = None           # also write a Triton model repository there
    tolerances: Tolerances | None = None
    dynamo: bool = False                            # torch.export-based exporter
    threads: int = 1                                # CPU threads for torch and onnxruntime
    model_kw: dict | None = None                    # MercuryConfig settings for a backbone JSON / timm name
                                                    # (a checkpoint keeps its own and refuses another prune_point)
    codecs: Sequence[str] = ()                      # token codecs "DxB": codec head/tail per keep ratio
    codec_images: int = 2000                        # calib_data images a codec is fit on (unless the checkpoint has it)
    log: Callable[[str], None] | None = _log

    def __post_init__(self):
        bad = [t for t in self.token_dtypes if t not in TOKEN_DTYPES]
        if bad:
            raise ExportError(f"unknown token dtype {bad}; choose from {TOKEN_DTYPES}")
        from ..formats.codec_wire import codec_name
        try:
            self.codecs = list(dict.fromkeys(map(codec_name, self.codecs)))
        except ValueError as e:
            raise ExportError(str(e)) from e
        if self.dynamo and self.opset < 18:   # the dynamo exporter starts at opset 18 and cannot convert down
            self.opset = 18

    def say(self, msg: str) -> None:
        if self.log:
            self.log(msg)

    def export(self, module, args, path: Path, io):
        """One graph with these options' opset and exporter: the saved onnx.ModelProto."""
        return export_onnx(module, args, path, *io, opset=self.opset, dynamo=self.dynamo)


def export_model(source: str | Path, out_dir: str | Path, keep_ratios: Sequence[float] = (0.5,),
                 options: ExportOptions | None = None, **kw) -> Path:
    """Export `source` (Mercury checkpoint, backbone JSON, or timm name) to out_dir: one
    head/tail pair per keep ratio, plus what `options` (or ExportOptions fields given as
    keywords) ask for. Returns out_dir. Raises ConfigError (bad model/settings), ExportError,
    ValidationFailed; out_dir is only ever replaced by a complete, validated export."""
    from ..models.checkpoint import is_mercury_checkpoint, mercury_from_any

    opts = replace(options, **kw) if options is not None else ExportOptions(**kw)
    source = str(source)
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise ExportError(f"{out} exists and is not an export folder; pick a new or empty folder")
    is_ckpt = is_mercury_checkpoint(source)
    kw = dict(opts.model_kw or {})
    if is_ckpt:   # a checkpoint carries its settings; only a prune point is checked against it
        kw = {"prune_point": kw["prune_point"]} if "prune_point" in kw else {}
    models = mercury_from_any(source, keep_ratios=list(keep_ratios), **kw)
    proxy = models[0].score_proxy
    if proxy is not None and not bool(proxy.fitted):
        opts.say("note: the score proxy (prune point attn) is not fitted, so the head scores the "
                 "post-attention stream as it is: `mercury-onnx calibrate --prune-point attn` fits it")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, opts.threads))
    try:
        out = _export(models, source, is_ckpt, out, opts)
    finally:
        torch.set_num_threads(prev_threads)
    if opts.triton_repo:
        from .triton import write_triton_repo
        opts.say(f"triton model repository: {write_triton_repo(out, opts.triton_repo)}")
    return out


def _export(models, source: str, is_ckpt: bool, out: Path, opts: ExportOptions) -> Path:
    """Every graph into a temporary folder beside out, validated, then renamed to out."""
    first, cfg = models[0], models[0].cfg
    size = tuple(first.backbone.patch_embed.img_size)                    # (H, W)
    val_dir = Path(opts.validate_data) if opts.validate_data else CIFAR10 / "test"
    try:
        images, labels = load_images(val_dir, opts.validate_images, size, cfg.mean, cfg.std,
                                     cfg.classes if cfg.classes else None)
    except FileNotFoundError as e:
        raise ExportError(f"validation images: {e}") from e

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        x = torch.from_numpy(images[:2])                                  # (2, 3, H, W) tracing input
        opts.say(f"export {cfg.timm_model} {cfg.overrides or ''} -> {out} (opset {opts.opset}, "
                 f"{'dynamo' if opts.dynamo else 'torchscript'} exporter)")
        opts.export(G.FullGraph(first), (x,), tmp / "full.onnx", G.FULL_IO)
        graph_ops: dict[str, dict] = {}
        variants = [_export_variant(m, x, tmp, opts, graph_ops) for m in models]
        fitted = {}
        if opts.codecs:
            from .codecs import export_codecs
            cal_dir = Path(opts.calib_data) if opts.calib_data else CIFAR10 / "train"
            fitted = export_codecs(models, variants, opts.codecs, tmp, x, cal_dir, opts.codec_images,
                                   opts.opset, opts.dynamo, opts.say, model_id(models))
        if opts.int8_head:
            _add_int8_heads(variants, tmp, cfg, size, opts, graph_ops)
        opts.say(f"  validate ORT vs torch on {len(images)} images from {val_dir}")
        report = validate_export(tmp, models, variants, "full.onnx", images, labels, opts.tolerances, opts.threads,
                                 codecs=fitted)
        report["data"] = str(val_dir)
        report["graph_checks"] = {f: {"TopK": ops.get("TopK", 0), "NonZero": ops.get("NonZero", 0)}
                                  for f, ops in graph_ops.items() if f.startswith("head")}
        if not report["passed"]:
            raise ValidationFailed(report)
        files = sorted(p.name for p in tmp.iterdir() if p.suffix in (".onnx", ".zdict"))
        write_manifest(tmp, _manifest(models, source, is_ckpt, opts, variants, report), files)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    opts.say(f"ok: {out} ({len(files)} graphs, validated on {len(images)} images)")
    return out


def _export_variant(m, x: torch.Tensor, tmp: Path, opts: ExportOptions, graph_ops: dict) -> dict:
    """One keep ratio's graphs (head, tail, and the optional tok8 / tok16 heads, fp16 tail)
    into tmp: their manifest entry. Records each graph's op counts in graph_ops."""
    k = m.keep
    opts.say(f"  K={k} of N={m.num_patches}: head, tail"
             + "".join(f", tok{8 if t == 'int8' else 16} head" for t in opts.token_dtypes))
    v = {"keep_ratio": round(k / m.num_patches, 6), "keep_tokens": k, "meta_params": m.num_meta_params(),
         "head": {"file": f"head_k{k}.onnx", "dtype": "float32"},
         "head_int8": None, "head_tok8": None, "head_tok16": None,
         "tail": {"file": f"tail_k{k}.onnx", "io_dtype": "float32"}, "tail_fp16": None}
    with torch.no_grad():
        tok, idx = m.forward_head(x)                                      # (2, P+K, D), (2, K)
    head = opts.export(G.HeadGraph(m), (x,), tmp / v["head"]["file"], G.HEAD_IO)
    graph_ops[v["head"]["file"]] = check_static_head(head)
    tail = opts.export(G.TailGraph(m), (tok, idx), tmp / v["tail"]["file"], G.TAIL_IO)
    graph_ops[v["tail"]["file"]] = op_counts(tail)
    if "int8" in opts.token_dtypes:
        v["head_tok8"] = {"file": f"head_k{k}_tok8.onnx", "tokens": "int8", "scales": "float32"}
        g = opts.export(G.Tok8Head(m), (x,), tmp / v["head_tok8"]["file"], G.TOK8_IO)
        graph_ops[v["head_tok8"]["file"]] = check_static_head(g)
    if "fp16" in opts.token_dtypes:
        v["head_tok16"] = {"file": f"head_k{k}_tok16.onnx", "tokens": "float16"}
        g = opts.export(G.Tok16Head(m), (x,), tmp / v["head_tok16"]["file"], G.HEAD_IO)
        graph_ops[v["head_tok16"]["file"]] = check_static_head(g)
    if opts.fp16_tail:
        from .quantize import tail_to_fp16
        v["tail_fp16"] = {"file": f"tail_k{k}_fp16.onnx", "io_dtype": "float16"}
        tail_to_fp16(tmp / v["tail"]["file"], tmp / v["tail_fp16"]["file"])
    return v


def _add_int8_heads(variants: list[dict], tmp: Path, cfg, size: tuple[int, int], opts: ExportOptions,
                    graph_ops: dict) -> None:
    """A QDQ int8 head per variant, calibrated on calib_images real images and the weight
    scales chosen on int8_select_images more."""
    from .quantize import quantize_head

    cal_dir = Path(opts.calib_data) if opts.calib_data else CIFAR10 / "train"
    try:
        cal_x, _ = load_images(cal_dir, opts.calib_images, size, cfg.mean, cfg.std)
        sel_x, sel_y = load_images(cal_dir, opts.int8_select_images, size, cfg.mean, cfg.std,
                                   cfg.classes if cfg.classes else None, offset=opts.calib_images)
    except FileNotFoundError as e:
        raise ExportError(f"int8 calibration images: {e}") from e
    for v in variants:
        opts.say(f"  K={v['keep_tokens']}: int8 head (calibrate on {len(cal_x)} images from {cal_dir}, "
                 f"pick per-channel or per-tensor weight scales on {len(sel_x)} more)")
        v["head_int8"] = {"file": f"head_k{v['keep_tokens']}_int8.onnx"}
        v["head_int8"].update(quantize_head(tmp / v["head"]["file"], tmp / v["head_int8"]["file"],
                                            tmp / v["tail"]["file"], cal_x, sel_x, sel_y, opts.threads))
        graph_ops[v["head_int8"]["file"]] = check_static_head(tmp / v["head_int8"]["file"])


def _manifest(models, source: str, is_ckpt: bool, opts: ExportOptions, variants: list[dict],
              report: dict) -> dict:
    """manifest.json's content (docs/FORMAT.md), less the format tag and file checksums."""
    import onnx
    import onnxruntime

    from ..models.checkpoint import read_checkpoint_json

    first, cfg = models[0], models[0].cfg
    h, w = first.backbone.patch_embed.img_size
    num_classes = first.backbone.num_classes
    return {
        "model_id": model_id(models), "source": source,
        "timm_model": cfg.timm_model, "overrides": cfg.overrides,
        "num_patches": first.num_patches, "num_prefix_tokens": first.num_prefix_tokens,
        "dim": first.dim, "grid": first.grid, "depth": first.depth,
        "num_classes": num_classes,
        "prune_after_block": first.prune_at, "split_after_block": first.split,
        "prune_point": cfg.prune_point,
        "score_proxy": ({"rank": cfg.score_proxy_rank, "kind": cfg.score_proxy_kind, "fitted": bool(first.score_proxy.fitted)}
                        if first.score_proxy is not None else None),
        "pruning": cfg.pruning, "score": cfg.score, "region_size": cfg.region_size,
        "reconstruction": cfg.reconstruction, "opset": opts.opset,
        "exporter": "dynamo" if opts.dynamo else "torchscript",
        "calibration": read_checkpoint_json(source).get("calibration") if is_ckpt else None,
        "preprocess": {"mean": list(cfg.mean), "std": list(cfg.std), "size": [h, w],
                       "resize": "bilinear", "scale": "pixels / 255, then (x - mean) / std"},
        "classes": list(cfg.classes) if cfg.classes else [str(i) for i in range(num_classes)],
        "full": {"file": "full.onnx"},
        "variants": variants,
        "validation": report,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp -> out; an existing export at out is replaced only once tmp is complete."""
    tmp.chmod(0o755)                       # mkdtemp makes it 0700
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
