"""CLI commands of this area, defined here, registered on the app by mercury_onnx/cli.py.

Keep module-level imports light (no torch/timm/onnx): import inside each command.
"""
from __future__ import annotations

from typing import List, Optional

import typer

from ..app import fail, need_export_extra


def export(
    source: str = typer.Argument(..., metavar="CHECKPOINT_OR_MODEL",
                                 help="Mercury checkpoint (from calibrate), `reference` (the shipped "
                                 "calibration), backbone JSON, or timm name"),
    out_dir: str = typer.Argument(..., help="export folder to create (replaced only once validated)"),
    keep_ratio: List[float] = typer.Option([0.5], "--keep-ratio", "-r", help="one head/tail per ratio"),
    opset: int = typer.Option(17, help="ONNX opset"),
    int8_head: bool = typer.Option(False, "--int8-head", help="also a QDQ int8 head for ARM"),
    calib_data: Optional[str] = typer.Option(None, help="images for int8 calibration "
                                             "(DIR/<class>/*.jpg; default CIFAR-10 train)"),
    calib_images: int = typer.Option(128, help="images used to calibrate the int8 head"),
    int8_select_images: int = typer.Option(256, help="held-out images that pick per-channel vs per-tensor int8 weight scales"),
    fp16_tail: bool = typer.Option(False, "--fp16-tail", help="also an fp16 tail for CUDA"),
    token_dtype: List[str] = typer.Option([], "--token-dtype",
                                          help="extra head with int8 (+ per-token scales) or fp16 tokens"),
    codec: List[str] = typer.Option([], "--codec", help="token codec DxB (e.g. 16x4: 16 principal dims, "
                                    "4 bits each) or eP (e.g. e6: entropy-coded, about 6% relative token "
                                    "error), repeatable: codec head/tail per keep ratio"),
    codec_images: int = typer.Option(2000, help="calibration images (--calib-data) the codec is fit on"),
    triton_repo: Optional[str] = typer.Option(None, help="also write a Triton model repository of the tails"),
    validate_data: Optional[str] = typer.Option(None, help="validation images (default CIFAR-10 test)"),
    validate_images: int = typer.Option(64, help="how many real images ORT is checked on"),
    dynamo: bool = typer.Option(False, "--dynamo", help="torch.export-based exporter (slower; opset >= 18)"),
    threads: int = typer.Option(1, help="CPU threads for torch and onnxruntime"),
    prune_after_block: Optional[int] = typer.Option(None, help="(backbone JSON / timm name only)"),
    split_after_block: Optional[int] = typer.Option(None, help="(backbone JSON / timm name only)"),
    reconstruction: Optional[str] = typer.Option(None, help="(backbone JSON / timm name only)"),
    prune_point: Optional[str] = typer.Option(None, help="block or attn (a checkpoint's own; "
                                              "a different one is refused)"),
) -> None:
    """Export head(s), tail(s) and the full model to ONNX, validate against PyTorch on real
    images, and write manifest.json (docs/FORMAT.md)."""
    need_export_extra("export")
    from ..models import ConfigError
    from .convert import ExportError
    from .pipeline import TOKEN_DTYPES, ExportOptions, ValidationFailed, export_model

    token_dtype = [{"fp16": "fp16", "float16": "fp16", "int8": "int8"}.get(t.lower(), t) for t in token_dtype]
    bad = [t for t in token_dtype if t not in TOKEN_DTYPES]
    if bad:
        fail(f"--token-dtype {bad[0]!r}: choose from {', '.join(TOKEN_DTYPES)}")
    if validate_images < 1:
        fail("--validate-images must be >= 1")
    if codec_images < 1:
        fail("--codec-images must be >= 1")
    model_kw = {k: v for k, v in dict(prune_after_block=prune_after_block, split_after_block=split_after_block,
                                      reconstruction=reconstruction, prune_point=prune_point).items()
                if v is not None}
    if not model_kw:
        from ..models.reference import use_shipped
        source = use_shipped(source, keep_ratio, typer.echo)
    try:
        opts = ExportOptions(opset=opset, token_dtypes=token_dtype, int8_head=int8_head, fp16_tail=fp16_tail,
                             calib_data=calib_data, calib_images=calib_images,
                             int8_select_images=int8_select_images, validate_data=validate_data,
                             validate_images=validate_images, triton_repo=triton_repo, dynamo=dynamo,
                             threads=threads, model_kw=model_kw, codecs=codec, codec_images=codec_images)
        out = export_model(source, out_dir, keep_ratio, opts)
    except ValidationFailed as e:
        fail(f"{e}\nnothing was written to {out_dir}", code=1)
    except (ConfigError, ExportError) as e:
        fail(str(e))
    _print_summary(out)


def _print_summary(out) -> None:
    from ..formats.manifest import load_manifest

    m = load_manifest(out)
    val = m["validation"]
    typer.echo(f"model_id {m['model_id']}  N={m['num_patches']} D={m['dim']}  files: {', '.join(m['files'])}")
    for name, d in val["max_abs_diff"].items():
        typer.echo(f"  max|ORT - torch| {name:<40} {d if d is None else f'{d:.3g}'}")
    for name, r in val["identical_index_rows"].items():
        typer.echo(f"  identical index rows {name:<36} {r}")
    for name, a in val["top1_agreement"].items():
        acc = val["accuracy"].get(name)
        typer.echo(f"  top-1 agreement  {name:<40} {a:.4f}" + ("" if acc is None else f"   accuracy {acc:.4f}"))
    typer.echo(f"validated on {val['images']} images: passed")
