"""Which resize rule the shared preprocessing uses, measured: what calibration / validation
would see under each candidate rule, against what the device feeds its head.

    python benchmarks/resize_rule.py [--images 500] [--out docs/results/formats.json]

Before issue 16 three rules coexisted: the device (runtime) resized the shorter side and
centre-cropped, bilinear; export validation and int8 calibration resized straight to the
input size, bilinear (aspect ratio lost); calib resized straight, bicubic. On the real photos
of ../shared/data/imagenet-sample (no labels, so no top-1) at 224x224 this prints, for each
rule against the device's: the normalised input's mean |difference|; the relative L2
difference of the first block's tokens (what the head prunes and sends) of timm
deit_tiny_patch16_224 with random weights (seed 0: no trained 224 weights here); and the
int8 calibration range a MinMax calibrator takes from those tokens (per tensor, and the
median / largest per-channel change). Plus the median resize time per photo on this machine.
At 32x32 (the reference model, CIFAR-10) no rule resizes anything: it counts the CIFAR-10
test images that are not 32x32 (so the rules cannot change the reference top-1).
Writes OUT (JSON); benchmarks/tables.py renders it into docs/results/formats.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mercury_onnx.formats.images import IMAGE_EXTS, list_images, load_image, normalise, resize_crop  # noqa: E402

SHARED = ROOT.parent / "shared"
SIZE = 224


def straight(im, h, w, resample):
    from PIL import Image
    return im if im.size == (w, h) else im.resize((w, h), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample])


RULES = {   # name -> (PIL image, h, w) -> PIL image
    "device: shorter side + centre crop, bilinear (chosen)": lambda im, h, w: resize_crop(im, h, w, "bilinear"),
    "shorter side + centre crop, bicubic": lambda im, h, w: resize_crop(im, h, w, "bicubic"),
    "old export: straight resize, bilinear": lambda im, h, w: straight(im, h, w, "bilinear"),
    "old calib: straight resize, bicubic": lambda im, h, w: straight(im, h, w, "bicubic"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "formats.json"))
    args = ap.parse_args()
    import timm
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = SHARED / "data" / "imagenet-sample"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)[: args.images]
    photos = [load_image(f) for f in files]
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]

    inputs, tokens, ms = {}, {}, {}
    for name, rule in RULES.items():
        times, batch = [], []
        for im in photos:
            t = time.perf_counter()
            batch.append(np.asarray(rule(im, SIZE, SIZE)))
            times.append((time.perf_counter() - t) * 1e3)
        x = normalise(np.stack(batch), mean, std)                     # (B, 3, H, W)
        with torch.no_grad():
            out = []
            for s in range(0, len(x), 50):
                t = model._pos_embed(model.patch_embed(torch.from_numpy(x[s: s + 50])))
                out.append(model.blocks[0](t).numpy())              # (b, 1+N, D)
        inputs[name], tokens[name], ms[name] = x, np.concatenate(out), float(np.median(times))
        print(f"{name}: {ms[name]:.2f} ms per photo", file=sys.stderr)

    ref = next(iter(RULES))
    t0 = tokens[ref]
    range0, chan0 = np.abs(t0).max(), np.abs(t0).max(axis=(0, 1))     # per tensor, per channel (D,)
    rows = {}
    for name in RULES:
        t = tokens[name]
        rel = np.linalg.norm((t - t0).reshape(len(t), -1), axis=1) / np.linalg.norm(t0.reshape(len(t), -1), axis=1)
        chan = np.abs(np.abs(t).max(axis=(0, 1)) / chan0 - 1)
        rows[name] = {"resize_ms_median": ms[name],
                      "input_mean_abs_diff": float(np.abs(inputs[name] - inputs[ref]).mean()),
                      "tokens_rel_l2_median": float(np.median(rel)), "tokens_rel_l2_max": float(rel.max()),
                      "int8_range_per_tensor_change": float(abs(np.abs(t).max() / range0 - 1)),
                      "int8_range_per_channel_change_median": float(np.median(chan)),
                      "int8_range_per_channel_change_max": float(chan.max())}
    cifar = SHARED / "data" / "cifar10" / "test"
    not32 = None
    if cifar.exists():
        from PIL import Image
        paths = list_images(cifar)[0][:2000]
        not32 = sum(Image.open(p).size != (32, 32) for p in paths)
    report = {"photos": len(files), "folder": str(folder.relative_to(SHARED.parent)), "size": SIZE,
              "model": "deit_tiny_patch16_224, random weights (seed 0), first block's output tokens",
              "reference": ref, "rules": rows,
              "cifar10_test_images_checked": 2000 if not32 is not None else 0, "cifar10_test_not_32x32": not32,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"}
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1))
    for name, r in rows.items():
        print(f"{name}: tokens rel. L2 median {100 * r['tokens_rel_l2_median']:.2f}%, "
              f"int8 range per tensor {100 * r['int8_range_per_tensor_change']:.2f}%")
    print(f"wrote {out}; python benchmarks/tables.py renders its table in docs/results/formats.md")


if __name__ == "__main__":
    main()
