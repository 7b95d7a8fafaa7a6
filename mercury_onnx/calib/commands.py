"""CLI commands of this area, defined here, registered on the app by mercury_onnx/cli.py.

Keep module-level imports light (no torch/timm/onnx): import inside each command.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..app import fail, need_export_extra, shown_path


def _overrides(img_size, patch_size, num_classes) -> dict:
    return {k: v for k, v in dict(img_size=img_size, patch_size=patch_size,
                                  num_classes=num_classes).items() if v is not None}


def _backbone_models(source: str, checkpoint: Optional[str], overrides: dict, keep_ratios: list[float], **method):
    """Mercury wrappers for keep_ratios on one backbone from a Mercury checkpoint (its backbone
    and method settings; `method` overrides them), a backbone JSON or a timm name."""
    import copy

    from ..models import build_mercury
    from ..models.checkpoint import is_mercury_checkpoint, load_mercury, mercury_from_any

    method = {k: v for k, v in method.items() if v is not None}
    if is_mercury_checkpoint(source):
        stored = load_mercury(source, **{k: v for k, v in method.items() if k == "prune_point"})   # refuses another point
        models = []
        for r in keep_ratios:
            cfg = copy.deepcopy(stored[0].cfg)
            for k, v in method.items():
                setattr(cfg, k, v)
            cfg.keep_ratio, cfg.keep_tokens = r, None
            models.append(build_mercury(cfg, stored[0].backbone))
        return models, stored
    kw = dict(method)
    if not source.endswith(".json"):
        kw.update(checkpoint=checkpoint, overrides=overrides)
    elif checkpoint or overrides:
        raise ValueError("--checkpoint / --img-size / --patch-size / --num-classes are for a timm name; "
                         "a backbone JSON names its own weights and overrides")
    return mercury_from_any(source, keep_ratios=keep_ratios, **kw), []


# ---------------------------------------------------------------- train

def train(
    data_dir: str = typer.Argument(..., help="ImageFolder: DATA_DIR/<class>/<image>"),
    model: str = typer.Option(..., "--model", "-m", help="timm name, or a backbone JSON to fine-tune"),
    checkpoint: Optional[str] = typer.Option(None, help="start from these weights (.safetensors/.pth)"),
    img_size: Optional[int] = typer.Option(None), patch_size: Optional[int] = typer.Option(None),
    num_classes: Optional[int] = typer.Option(None, help="default: the number of class folders"),
    out: str = typer.Option(..., help="writes OUT.safetensors + OUT.json (+ OUT.state.pt for --resume)"),
    epochs: float = typer.Option(1.0), steps: Optional[int] = typer.Option(None, help="wins over --epochs"),
    batch_size: int = typer.Option(128), lr: float = typer.Option(1e-3),
    images: Optional[int] = typer.Option(None, help="train on a deterministic class-balanced subset"),
    eval_dir: Optional[str] = typer.Option(None, help="test split to report test_top1 on"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="default: on where the CPU has native bf16"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT.state.pt"),
    seed: int = typer.Option(0),
) -> None:
    """Train or fine-tune a timm backbone (AdamW, cosine + warmup, label smoothing, crop + flip)."""
    need_export_extra("train")
    from ..models import ConfigError, MercuryConfig
    from ..formats.images import ImageError, list_images
    from .train import TrainSettings
    from .train import train as run_train

    if steps is not None and steps < 1 or epochs <= 0 or batch_size < 1:
        fail("--steps, --epochs and --batch-size must be positive")
    try:
        overrides = _overrides(img_size, patch_size, num_classes)
        if model.endswith(".json"):
            cfg = MercuryConfig.from_checkpoint_json(model)
            cfg.overrides.update(overrides)
        else:
            if "num_classes" not in overrides:
                overrides["num_classes"] = len(list_images(data_dir)[2])
            cfg = MercuryConfig(timm_model=model, checkpoint=checkpoint, overrides=overrides)
        meta = run_train(cfg, data_dir, out, TrainSettings(epochs=epochs, steps=steps, batch_size=batch_size,
                                                           lr=lr, bf16=bf16, seed=seed),
                         resume=resume, images=images, eval_dir=eval_dir)
    except (ConfigError, ImageError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    typer.echo(json.dumps({k: meta[k] for k in ("steps", "epochs_seen", "first_loss", "last_loss",
                                                "train_minutes") if k in meta}))
    if "test_top1" in meta:
        typer.echo(f"test top-1 {100 * meta['test_top1']:.2f}% on {meta['test_images']} images")
    typer.echo(f"wrote {Path(out).with_suffix('.safetensors')} and {Path(out).with_suffix('.json')}")


# ---------------------------------------------------------------- calibrate

def calibrate(
    source: str = typer.Argument(..., metavar="CHECKPOINT_OR_MODEL",
                                 help="backbone JSON, Mercury checkpoint, or timm name (+ --checkpoint)"),
    data_dir: str = typer.Argument(..., help="training images, DATA_DIR/<class>/<image>"),
    keep_ratio: List[float] = typer.Option([0.5], "--keep-ratio", "-r", help="repeatable; one meta set per ratio"),
    out: str = typer.Option(..., help="Mercury checkpoint to write (OUT.safetensors + OUT.json)"),
    images: int = typer.Option(5000, help="calibration images (class-balanced, seeded)"),
    heldout: int = typer.Option(1000, help="held-out images (disjoint) for before/after top-1; 0 = none"),
    steps: int = typer.Option(200), batch_size: int = typer.Option(64), lr: float = typer.Option(3e-3),
    temperature: List[float] = typer.Option([], help="distillation temperature (default 1): once for all "
                                            "ratios, or once per -r in the same order"),
    choose_temperature: List[float] = typer.Option([], help="repeatable: candidate temperatures, each ratio "
                                                   "keeps the one with the lowest held-out KL (needs --heldout)"),
    ce_weight: float = typer.Option(0.0, help="add this times CE on the labels (0 = labels unused)"),
    no_init: bool = typer.Option(False, "--no-init", help="skip the closed-form init (ablation)"),
    reconstruction: Optional[str] = typer.Option(None, help="default: meta-local / the checkpoint's"),
    pruning: Optional[str] = typer.Option(None, help="default: regional / the checkpoint's"),
    score: Optional[str] = typer.Option(None, help="similarity (default), product or attention; default: the checkpoint's"),
    prune_point: Optional[str] = typer.Option(None, help="block (default: prune after the whole block) or attn "
                                              "(after its attention: its MLP runs on the kept tokens only)"),
    score_proxy_width: Optional[int] = typer.Option(None, help="prune point attn: width of the score proxy, the "
                                                    "fitted stand-in for the MLP half that the selection scores "
                                                    "(default 64 / the checkpoint's)"),
    checkpoint: Optional[str] = typer.Option(None, help="backbone weights for a timm name"),
    img_size: Optional[int] = typer.Option(None), patch_size: Optional[int] = typer.Option(None),
    num_classes: Optional[int] = typer.Option(None),
    codec: Optional[str] = typer.Option(None, "--codec", help="token codec DxB in the loop (e.g. 16x4): fit on "
                                        "the calibration images, the fill learns from decoded codes; "
                                        "the codec is saved with the checkpoint"),
    seed: int = typer.Option(0), cache: bool = typer.Option(False, "--cache", help="cache decoded images in ~/.cache/mercury-onnx"),
    jobs: int = typer.Option(1, help="calibrate this many keep ratios at once, one process each (same result)"),
) -> None:
    """Learn the meta-parameters (backbone frozen) by distilling the unpruned model."""
    need_export_extra("calibrate")
    from ..models.checkpoint import save_mercury
    from .recipe import combine_parts, per_ratio_temperatures, run_parallel, summary_line
    from ..formats.codec_wire import parse_codec

    if images < 1 or steps < 0 or batch_size < 1 or heldout < 0 or jobs < 1:
        fail("--images, --batch-size and --jobs must be >= 1, --steps and --heldout >= 0")
    if score_proxy_width is not None and score_proxy_width < 1:
        fail("--score-proxy-width must be >= 1")
    if temperature and choose_temperature:
        fail("give --temperature or --choose-temperature, not both")
    if choose_temperature and not heldout:
        fail("--choose-temperature chooses on the held-out slice: set --heldout > 0")
    try:
        if codec and codec.strip().lower().startswith("e"):
            raise ValueError(f"--codec {codec}: in the loop takes a DxB codec; an eP codec is fit at export "
                             "and eval on the calibrated model's tokens")
        codec_db = parse_codec(codec) if codec else None
        temps = per_ratio_temperatures(temperature, len(keep_ratio))
    except ValueError as e:
        fail(str(e))
    t0 = time.time()
    if jobs > 1 and len(keep_ratio) > 1:
        shared = [source, data_dir, "--images", images, "--heldout", heldout, "--steps", steps, "--batch-size",
                  batch_size, "--lr", lr, "--ce-weight", ce_weight, "--seed", seed]
        for flag, v in (("--reconstruction", reconstruction), ("--pruning", pruning), ("--score", score),
                        ("--prune-point", prune_point), ("--score-proxy-width", score_proxy_width),
                        ("--checkpoint", checkpoint), ("--img-size", img_size),
                        ("--patch-size", patch_size), ("--num-classes", num_classes)):
            if v is not None:
                shared += [flag, v]
        shared += (["--no-init"] if no_init else []) + (["--cache"] if cache else [])
        shared += ["--codec", codec] if codec_db else []
        for t in choose_temperature:
            shared += ["--choose-temperature", t]
        parts = [f"{Path(out).with_suffix('')}_part{i}" for i in range(len(keep_ratio))]
        argvs = [[str(a) for a in shared + ["-r", r, "--out", part] + ([] if choose_temperature else ["--temperature", t])]
                 for r, t, part in zip(keep_ratio, temps, parts)]
        typer.echo(f"calibrating keep ratios {keep_ratio} in {len(argvs)} processes")
        try:
            run_parallel(argvs, parts, log=typer.echo)
        except RuntimeError as e:
            fail(str(e), code=1)
        models, per_k = combine_parts(parts)
        for m in models:
            typer.echo(summary_line(m, per_k[str(m.keep)]))
        train_n = per_k[str(models[0].keep)]["images"]
        held_n = per_k[str(models[0].keep)].get("heldout_images", 0)
    else:
        models, per_k, train_n, held_n = _calibrate_here(
            source, data_dir, keep_ratio, images, heldout, steps, batch_size, lr, ce_weight, no_init, reconstruction,
            pruning, score, prune_point, checkpoint, img_size, patch_size, num_classes, seed, cache, temps,
            choose_temperature, codec_db, score_proxy_width)
    chosen = {k: rep["temperature_choice"]["chosen"] for k, rep in per_k.items()}
    report = {"data": str(data_dir), "images": train_n, "heldout_images": held_n,
              "steps": steps, "batch_size": batch_size, "lr": lr, "temperature_per_keep_tokens": chosen,
              **({"temperature": next(iter(chosen.values()))} if len(set(chosen.values())) == 1 else {}),
              "temperature_candidates": choose_temperature,
              "ce_weight": ce_weight, "closed_form_init": not no_init, "seed": seed, "jobs": jobs,
              "codec": codec_db and codec,
              "minutes": round((time.time() - t0) / 60, 2), "per_keep_tokens": per_k}
    weights, meta = save_mercury(out, models, calibration=report)
    typer.echo(f"wrote {weights} and {meta} ({report['minutes']} min)")


def _calibrate_here(source, data_dir, keep_ratio, images, heldout, steps, batch_size, lr, ce_weight, no_init,
                    reconstruction, pruning, score, prune_point, checkpoint, img_size, patch_size, num_classes, seed,
                    cache, temps, choose_temperature, codec_db=None, score_proxy_width=None):
    """calibrate's work in this process: models, per-K reports, train and held-out image counts."""
    from ..formats.images import ImageError
    from ..models import ConfigError
    from ..models.codec import fit_codec
    from .calibrate import CalibSettings, head_outputs, run_prefix
    from .data import load_image_set, preprocess_for
    from .recipe import calibrate_all

    try:
        models, _ = _backbone_models(source, checkpoint, _overrides(img_size, patch_size, num_classes),
                                     keep_ratio, reconstruction=reconstruction, pruning=pruning, score=score,
                                     prune_point=prune_point, score_proxy_rank=score_proxy_width)
        base = models[0]
        if not base.recon.learned:
            fail(f"reconstruction {base.cfg.reconstruction!r} has nothing to learn; "
                 "choose meta-ctx, meta-local, meta-pos, mask or generator")
        pre = preprocess_for(base)
        held, held_pos = (load_image_set(data_dir, pre, base.cfg.classes, count=heldout, seed=seed + 1, cache=cache)
                          if heldout else (None, []))
        train_set, _ = load_image_set(data_dir, pre, base.cfg.classes, count=images, seed=seed,
                                      exclude=set(held_pos), cache=cache)
    except (ConfigError, ImageError, ValueError) as e:
        fail(str(e))
    typer.echo(f"calibrating {base.cfg.pruning}+{base.cfg.reconstruction} (prune point {base.cfg.prune_point}) "
               f"at K={[m.keep for m in models]} "
               f"on {len(train_set)} images of {data_dir} (held out: {len(held) if held else 0})")
    s = CalibSettings(steps=steps, batch_size=batch_size, lr=lr, ce_weight=ce_weight, seed=seed,
                      closed_form_init=not no_init)
    train_pre = run_prefix(base, train_set)
    held_pre = run_prefix(base, held) if held else None
    proxy = base.fit_score_proxy(train_pre.x, seed)   # prune point attn: before any head output is computed
    if proxy is not None:
        typer.echo(f"score proxy: {proxy['kind']}, width {proxy['rank']}, explains {proxy['explained']:.3f} of the MLP half "
                   f"on {proxy['rows']} token rows")
    if codec_db:   # fit on the calibration images' head outputs, then train through it
        for m in models:
            m.codec = None
            tok, idx = head_outputs(m, train_pre)
            m.codec = fit_codec(tok, idx, m.num_patches, *codec_db)
            del tok, idx
            typer.echo(f"K={m.keep}: codec {m.codec.name} in the loop (variance kept {m.codec.variance_kept:.4f})")
    per_k = calibrate_all(models, train_pre, s, held_pre, temps, choose_temperature, log=typer.echo)
    if proxy is not None:   # one fit for every K: in each K's report
        for rep in per_k.values():
            rep["score_proxy"] = proxy
    if codec_db:
        for m in models:
            per_k[str(m.keep)]["codec"] = {"name": m.codec.name, "variance_kept": m.codec.variance_kept}
    return models, per_k, len(train_set), len(held) if held else 0


# ---------------------------------------------------------------- eval

def evaluate(
    data_dir: str = typer.Argument(..., help="evaluation split, DATA_DIR/<class>/<image>"),
    checkpoint: str = typer.Option(..., help="Mercury checkpoint (from calibrate), `reference` (the shipped "
                                   "calibration), or backbone JSON"),
    keep_ratio: List[float] = typer.Option([0.5, 0.25], "--keep-ratio", "-r", help="repeatable"),
    images: Optional[int] = typer.Option(None, help="class-balanced seeded subset (default: all)"),
    methods: str = typer.Option("all", help="'all' (every baseline), 'main' (vanilla + mercury), or "
                                "a comma-separated list of baseline names, e.g. regional+duplicate,evit"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write the results JSON here"),
    plot_out: Optional[str] = typer.Option(None, "--plot", help="write accuracy vs keep ratio (PNG)"),
    onnx_dir: Optional[str] = typer.Option(None, "--onnx", help="evaluate this export folder under onnxruntime"),
    calib_data: Optional[str] = typer.Option(None, help="train images for on-the-fly calibration "
                                             "(default: DATA_DIR/../train)"),
    calib_images: Optional[int] = typer.Option(None, help="default: the checkpoint's calibration budget"),
    calib_steps: Optional[int] = typer.Option(None, help="default: the checkpoint's calibration budget"),
    calib_batch_size: Optional[int] = typer.Option(None, help="default: the checkpoint's calibration budget"),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="calibrate Mercury here too, with the "
                                     "same budget as the baselines (ignore the checkpoint's meta-parameters)"),
    prune_point: Optional[str] = typer.Option(None, help="block or attn, for a backbone JSON (default block); "
                                              "a Mercury checkpoint keeps its own"),
    codec: List[str] = typer.Option([], "--codec", help="also Mercury with token codec DxB (e.g. 16x4) "
                                    "or eP (e.g. e6: entropy-coded, ~6% token error), repeatable; fit on --codec-images train images unless the checkpoint "
                                    "was calibrated with it"),
    codec_images: int = typer.Option(2000, help="train images (--calib-data) the codecs are fit on"),
    rate_curve: bool = typer.Option(False, "--rate-curve", help="rate-accuracy: payload bytes on every row, "
                                    "+ JPEG/WebP/AVIF of the test images; --plot draws top-1 vs bytes"),
    image_codecs: str = typer.Option("jpeg,webp,avif", help="with --rate-curve: image formats (qualities "
                                     "in calib/ratecurve.py)"),
    batch_size: int = typer.Option(256), seed: int = typer.Option(0),
    cache: bool = typer.Option(False, "--cache", help="cache decoded images in ~/.cache/mercury-onnx"),
) -> None:
    """Top-1 of vanilla, Mercury and the baselines; table, JSON and plot.

    Mercury's meta-parameters are read from the checkpoint (with --recalibrate, or from a
    backbone JSON, they are calibrated here like the rest). Other learned reconstructions are
    calibrated here on train images with the checkpoint's calibration budget (images, steps,
    batch size, lr) unless --calib-* say otherwise: with --recalibrate every learned method
    gets exactly the same budget and recipe."""
    need_export_extra("eval")
    from ..models import ConfigError
    from ..models.checkpoint import is_mercury_checkpoint, read_checkpoint_json
    from .calibrate import CalibSettings, run_prefix
    from ..formats.images import ImageError
    from .data import load_image_set, preprocess_for
    from .evaluate import evaluate as run_eval
    from .evaluate import format_table, method_grid, plot, prepare

    t0 = time.time()
    from ..formats.codec_wire import codec_name
    try:
        codec = list(dict.fromkeys(map(codec_name, codec)))
        if rate_curve:
            from .ratecurve import QUALITIES
            formats = {f.strip(): QUALITIES[f.strip()] for f in image_codecs.split(",") if f.strip()}
    except ValueError as e:
        fail(str(e))
    except KeyError as e:
        fail(f"--image-codecs: unknown format {e}; choose from jpeg, webp, avif")
    if (codec or rate_curve) and onnx_dir is not None:
        fail("--codec / --rate-curve evaluate in PyTorch; drop --onnx")
    if not recalibrate:
        from ..models.reference import use_shipped
        checkpoint = use_shipped(checkpoint, keep_ratio, typer.echo)
    try:
        models, stored = _backbone_models(checkpoint, None, {}, keep_ratio[:1], prune_point=prune_point)
        base = models[0]
        grid = method_grid(base.cfg.reconstruction, methods, base.cfg.score)   # a bad --methods fails before any image is read
        pre = preprocess_for(base)
        test, _ = load_image_set(data_dir, pre, base.cfg.classes, count=images, seed=seed, cache=cache)
    except (ConfigError, ImageError, ValueError) as e:
        fail(str(e))
    dataset = f"{Path(data_dir).resolve().parent.name}/{Path(data_dir).name}"
    if onnx_dir is not None:
        from ..formats.manifest import ManifestError
        from .onnx_eval import evaluate_onnx
        try:
            rows = evaluate_onnx(onnx_dir, test, keep_ratio, batch_size=batch_size)
        except (ManifestError, ValueError) as e:
            fail(str(e))
    else:
        budget = read_checkpoint_json(checkpoint).get("calibration", {}) if is_mercury_checkpoint(checkpoint) else {}
        s = CalibSettings(steps=calib_steps if calib_steps is not None else budget.get("steps", 200),
                          batch_size=calib_batch_size or budget.get("batch_size", 64), lr=budget.get("lr", 3e-3),
                          temperature=budget.get("temperature", 1.0), ce_weight=budget.get("ce_weight", 0.0),
                          seed=seed)
        n_calib = calib_images if calib_images is not None else budget.get("images", 5000)
        stored_by_k = {} if recalibrate else {m.keep: m for m in stored}
        full_keep = [r for r in keep_ratio if r >= 1.0]   # K = N: no fill, the codec alone
        keep_ratio = [r for r in keep_ratio if r < 1.0]
        needs = [meth for meth in grid[1:] if meth.name != "mercury" or not stored_by_k]
        calib_pre = None
        if any(meth.reconstruction in ("meta-pos", "meta-ctx", "meta-local", "mask", "generator")
               for meth in needs):
            calib_dir = calib_data or str(Path(data_dir).resolve().parent / "train")
            try:
                cal, _ = load_image_set(calib_dir, pre, base.cfg.classes, count=n_calib, seed=seed, cache=cache)
            except ImageError as e:
                fail(f"{e} (learned baselines are calibrated on train images: pass --calib-data)")
            typer.echo(f"calibrating learned baselines on {len(cal)} images of {calib_dir}, "
                       f"{s.steps} steps of {s.batch_size}")
            calib_pre = run_prefix(base, cal)
        try:
            ready = prepare(base, stored_by_k, grid, keep_ratio, calib_pre, s, log=typer.echo)
        except ConfigError as e:
            fail(str(e))
        del calib_pre
        if codec:
            from .codec_eval import codec_entries
            ready += codec_entries(base, ready, stored_by_k, codec, keep_ratio + full_keep,
                                   calib_data or str(Path(data_dir).resolve().parent / "train"),
                                   codec_images, seed, cache, log=typer.echo)
        codes = {}
        rows = run_eval(base, ready, test, batch_size=batch_size, codes_out=codes)
        if rate_curve:
            from .codec_eval import add_rate_rows
            rows = add_rate_rows(base, ready, rows, codes, test, data_dir, formats, batch_size, images, seed,
                                  log=typer.echo)
    minutes = (time.time() - t0) / 60
    typer.echo(f"\n{dataset}: {len(test)} images, {minutes:.1f} min")
    typer.echo(format_table(rows))
    result = {"dataset": dataset, "images": len(test), "prune_point": base.cfg.prune_point, "results": rows,
              "checkpoint": shown_path(checkpoint),
              "calibration": (read_checkpoint_json(checkpoint).get("calibration")
                              if is_mercury_checkpoint(checkpoint) and not recalibrate else None)}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
        typer.echo(f"wrote {json_out}")
    if plot_out and rate_curve:
        from .ratecurve import plot_rate
        Path(plot_out).parent.mkdir(parents=True, exist_ok=True)
        plot_rate(rows, plot_out, title=f"{base.cfg.timm_model} {base.cfg.overrides or ''} on {dataset} "
                  f"({len(test)} images): top-1 vs bytes on the wire")
        typer.echo(f"wrote {plot_out}")
    elif plot_out:
        Path(plot_out).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, plot_out, title=f"{base.cfg.timm_model} {base.cfg.overrides or ''} on {dataset} ({len(test)} images)")
        typer.echo(f"wrote {plot_out}")
