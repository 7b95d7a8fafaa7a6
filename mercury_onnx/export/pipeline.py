"""export_model: a Mercury model -> a validated export folder (docs/FORMAT.md).

Steps: build the Mercury wrappers (checkpoint, backbone JSON or timm name) -> export
full / head / tail graphs (+ optional tok8 / tok16 heads, int8 head, fp16 tail) into a
temporary folder beside OUT_DIR -> validate ORT against torch on real images -> write
manifest.json -> rename the folder to OUT_DIR. A failed validation deletes the temporary
folder and raises, so OUT_DIR never looks like a valid export it is not (an older export
already there is left untouched).
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import tempfile
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


def export_model(source: str | Path, out_dir: str | Path, keep_ratios: Sequence[float] = (0.5,), *,
                 opset: int = 17, token_dtypes: Sequence[str] = (), int8_head: bool = False,
                 fp16_tail: bool = False, calib_data: str | Path | None = None, calib_images: int = 128,
                 int8_select_images: int = 256, validate_data: str | Path | None = None,
                 validate_images: int = 64, triton_repo: str | Path | None = None,
                 tolerances: Tolerances | None = None, dynamo: bool = False, threads: int = 1,
                 model_kw: dict | None = None, log: Callable[[str], None] | None = _log) -> Path:
    """Export `source` (Mercury checkpoint, backbone JSON, or timm name) to out_dir.

    keep_ratios: one head/tail pair per ratio. token_dtypes: extra heads emitting "int8"
    tokens (+ per-token scales) or "fp16" tokens. int8_head: QDQ int8 head (calibrated on
    calib_data, default CIFAR-10 train). fp16_tail: fp16 tail for CUDA. validate_data
    (default CIFAR-10 test) / validate_images: the real images ORT is checked on.
    model_kw: MercuryConfig settings for a backbone JSON / timm name (prune_after_block, ...).
    Returns out_dir. Raises ConfigError (bad model/settings), ExportError, ValidationFailed.
    """
    from ..models.checkpoint import is_mercury_checkpoint, mercury_from_any

    log = log or (lambda msg: None)
    source = str(source)
    bad = [t for t in token_dtypes if t not in TOKEN_DTYPES]
    if bad:
        raise ExportError(f"unknown token dtype {bad}; choose from {TOKEN_DTYPES}")
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise ExportError(f"{out} exists and is not an export folder; pick a new or empty folder")
    if dynamo and opset < 18:   # the dynamo exporter starts at opset 18 and cannot convert down
        opset = 18
    is_ckpt = is_mercury_checkpoint(source)
    models = mercury_from_any(source, keep_ratios=list(keep_ratios), **({} if is_ckpt else (model_kw or {})))
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _export(models, source, is_ckpt, out, opset, token_dtypes, int8_head, fp16_tail, calib_data,
                       calib_images, int8_select_images, validate_data, validate_images, triton_repo,
                       tolerances, dynamo, threads, log)
    finally:
        torch.set_num_threads(prev_threads)


def _export(models, source, is_ckpt, out, opset, token_dtypes, int8_head, fp16_tail, calib_data,
            calib_images, int8_select_images, validate_data, validate_images, triton_repo,
            tolerances, dynamo, threads, log) -> Path:
    from ..models.checkpoint import read_checkpoint_json

    first, cfg = models[0], models[0].cfg

    h, w = first.backbone.patch_embed.img_size
    num_classes = first.backbone.num_classes
    classes = list(cfg.classes) if cfg.classes else [str(i) for i in range(num_classes)]
    val_dir = Path(validate_data) if validate_data else CIFAR10 / "test"
    try:
        images, labels = load_images(val_dir, validate_images, (h, w), cfg.mean, cfg.std,
                                     cfg.classes if cfg.classes else None)
    except FileNotFoundError as e:
        raise ExportError(f"validation images: {e}") from e

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        x = torch.from_numpy(images[:2])
        log(f"export {cfg.timm_model} {cfg.overrides or ''} -> {out} (opset {opset}, "
            f"{'dynamo' if dynamo else 'torchscript'} exporter)")
        export_onnx(G.FullGraph(first), (x,), tmp / "full.onnx", *G.FULL_IO, opset=opset, dynamo=dynamo)
        variants, graph_ops = [], {}
        for m in models:
            k = m.keep
            log(f"  K={k} of N={m.num_patches}: head, tail"
                + "".join(f", tok{8 if t == 'int8' else 16} head" for t in token_dtypes))
            v = {"keep_ratio": round(k / m.num_patches, 6), "keep_tokens": k,
                 "meta_params": m.num_meta_params(),
                 "head": {"file": f"head_k{k}.onnx", "dtype": "float32"},
                 "head_int8": None, "head_tok8": None, "head_tok16": None,
                 "tail": {"file": f"tail_k{k}.onnx", "io_dtype": "float32"}, "tail_fp16": None}
            with torch.no_grad():
                tok, idx = m.forward_head(x)
            head = export_onnx(G.HeadGraph(m), (x,), tmp / v["head"]["file"], *G.HEAD_IO, opset=opset, dynamo=dynamo)
            graph_ops[v["head"]["file"]] = check_static_head(head)
            tail = export_onnx(G.TailGraph(m), (tok, idx), tmp / v["tail"]["file"], *G.TAIL_IO, opset=opset, dynamo=dynamo)
            graph_ops[v["tail"]["file"]] = op_counts(tail)
            if "int8" in token_dtypes:
                v["head_tok8"] = {"file": f"head_k{k}_tok8.onnx", "tokens": "int8", "scales": "float32"}
                g = export_onnx(G.Tok8Head(m), (x,), tmp / v["head_tok8"]["file"], *G.TOK8_IO, opset=opset, dynamo=dynamo)
                graph_ops[v["head_tok8"]["file"]] = check_static_head(g)
            if "fp16" in token_dtypes:
                v["head_tok16"] = {"file": f"head_k{k}_tok16.onnx", "tokens": "float16"}
                g = export_onnx(G.Tok16Head(m), (x,), tmp / v["head_tok16"]["file"], *G.HEAD_IO, opset=opset, dynamo=dynamo)
                graph_ops[v["head_tok16"]["file"]] = check_static_head(g)
            if fp16_tail:
                from .quantize import tail_to_fp16
                v["tail_fp16"] = {"file": f"tail_k{k}_fp16.onnx", "io_dtype": "float16"}
                tail_to_fp16(tmp / v["tail"]["file"], tmp / v["tail_fp16"]["file"])
            variants.append(v)

        if int8_head:
            from .quantize import quantize_head
            cal_dir = Path(calib_data) if calib_data else CIFAR10 / "train"
            try:
                cal_x, _ = load_images(cal_dir, calib_images, (h, w), cfg.mean, cfg.std)
                sel_x, sel_y = load_images(cal_dir, int8_select_images, (h, w), cfg.mean, cfg.std,
                                           cfg.classes if cfg.classes else None, offset=calib_images)
            except FileNotFoundError as e:
                raise ExportError(f"int8 calibration images: {e}") from e
            for v in variants:
                log(f"  K={v['keep_tokens']}: int8 head (calibrate on {len(cal_x)} images from {cal_dir}, "
                    f"pick per-channel or per-tensor weight scales on {len(sel_x)} more)")
                v["head_int8"] = {"file": f"head_k{v['keep_tokens']}_int8.onnx"}
                v["head_int8"].update(quantize_head(tmp / v["head"]["file"], tmp / v["head_int8"]["file"],
                                                    tmp / v["tail"]["file"], cal_x, sel_x, sel_y, threads))
                graph_ops[v["head_int8"]["file"]] = check_static_head(tmp / v["head_int8"]["file"])

        log(f"  validate ORT vs torch on {len(images)} images from {val_dir}")
        report = validate_export(tmp, models, variants, "full.onnx", images, labels, tolerances, threads)
        report["data"] = str(val_dir)
        report["graph_checks"] = {f: {"TopK": ops.get("TopK", 0), "NonZero": ops.get("NonZero", 0)}
                                  for f, ops in graph_ops.items() if f.startswith("head")}
        if not report["passed"]:
            raise ValidationFailed(report)

        import onnx
        import onnxruntime
        manifest = {
            "model_id": model_id(models), "source": source,
            "timm_model": cfg.timm_model, "overrides": cfg.overrides,
            "num_patches": first.num_patches, "dim": first.dim, "grid": first.grid, "depth": first.depth,
            "num_classes": num_classes,
            "prune_after_block": first.prune_at, "split_after_block": first.split,
            "pruning": cfg.pruning, "score": cfg.score, "region_size": cfg.region_size,
            "reconstruction": cfg.reconstruction, "opset": opset,
            "exporter": "dynamo" if dynamo else "torchscript",
            "calibration": read_checkpoint_json(source).get("calibration") if is_ckpt else None,
            "preprocess": {"mean": list(cfg.mean), "std": list(cfg.std), "size": [h, w],
                           "resize": "bilinear", "scale": "pixels / 255, then (x - mean) / std"},
            "classes": classes,
            "full": {"file": "full.onnx"},
            "variants": variants,
            "validation": report,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        }
        files = sorted(p.name for p in tmp.iterdir() if p.suffix == ".onnx")
        write_manifest(tmp, manifest, files)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"ok: {out} ({len(files)} graphs, validated on {len(images)} images)")
    if triton_repo:
        from .triton import write_triton_repo
        repo = write_triton_repo(out, triton_repo)
        log(f"triton model repository: {repo}")
    return out


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
