"""Rate-accuracy: top-1 against the mean bytes on the wire (`eval --codec`, `eval --rate-curve`).

Rows: {method, keep_ratio, codec, quality, payload_bytes, top1}.
- vanilla: the full model on the stored images; payload = their mean file size.
- jpeg / webp / avif at a quality: every test image re-encoded with Pillow from its decoded
  pixels, decoded again, classified by the full model; payload = mean encoded size.
- mercury without codec: int8 tokens (runtime/codec.py's payload, header included).
- mercury with codec DxB: codec_wire.encode of each image's codes alone (B = 1: header, mask,
  bit-packed codes, zstd with the dictionary trained on calibration codes), the real encoder;
  `entropy_bytes` is the codes' empirical order-0 entropy (no header or mask) for the gap.
"""
from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import torch

from ..models.codec import TokenCodec, codec_bytes
from .data import ImageSet

QUALITIES = {"jpeg": (5, 10, 20, 30, 50, 75, 90, 95), "webp": (30, 50, 75, 90), "avif": (30, 50, 75, 90)}
EVAL_MODEL_ID = "0" * 16   # the header's model id is 8 bytes whatever its value


def recode(images: np.ndarray, fmt: str, quality: int) -> tuple[np.ndarray, list[int]]:
    """uint8 (M, H, W, 3) -> the same re-encoded at `quality` and decoded, and each file's bytes."""
    from PIL import Image

    out, sizes = np.empty_like(images), []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt.upper(), quality=quality)
        sizes.append(buf.tell())
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out, sizes


@torch.inference_mode()
def image_codec_rows(backbone, images: ImageSet, formats: dict[str, tuple[int, ...]], batch_size: int = 256,
                     log=print) -> list[dict]:
    """Top-1 of the full model on each format/quality's re-encoded images."""
    rows = []
    raw = images.images.numpy()
    for fmt, qualities in formats.items():
        for q in qualities:
            rec, sizes = recode(raw, fmt, q)
            correct = 0
            for s in range(0, len(rec), batch_size):
                x = images.normalise(torch.from_numpy(rec[s: s + batch_size]))
                correct += (backbone(x).argmax(-1) == images.labels[s: s + batch_size]).sum().item()
            rows.append({"method": fmt, "keep_ratio": 1.0, "codec": None, "quality": q,
                         "payload_bytes": round(float(np.mean(sizes)), 2), "top1": correct / len(rec)})
            log(f"{fmt} q{q}: {rows[-1]['payload_bytes']:.0f} B, top-1 {100 * rows[-1]['top1']:.2f}%")
    return rows


def codec_dictionary(codec: TokenCodec, calib_codes: np.ndarray) -> tuple[bytes, str]:
    """The zstd dictionary trained on calibration codes, and the codec id the export would give."""
    from ..formats import codec_wire

    dictionary = codec_wire.train_dictionary(calib_codes, codec.bits, codec.entropy is not None)
    cid = codec_wire.codec_id(EVAL_MODEL_ID, codec.dims, codec.bits, hashlib.sha256(codec_bytes(codec)).hexdigest(),
                              hashlib.sha256(dictionary).hexdigest())
    return dictionary, cid


def codec_payloads(codes: np.ndarray, indices: np.ndarray, num_patches: int, codec: TokenCodec,
                   dictionary: bytes, cid: str) -> dict:
    """Mean bytes of one payload per image (B = 1) with and without the dictionary, + entropy."""
    from ..formats import codec_wire

    with_dict = [len(codec_wire.encode(codes[i: i + 1], indices[i: i + 1], num_patches, codec.bits,
                                       EVAL_MODEL_ID, cid, dictionary)) for i in range(len(codes))]
    plain = [len(codec_wire.encode(codes[i: i + 1], indices[i: i + 1], num_patches, codec.bits,
                                   EVAL_MODEL_ID, cid, None)) for i in range(len(codes))]
    return {"payload_bytes": round(float(np.mean(with_dict)), 2),
            "payload_bytes_no_dictionary": round(float(np.mean(plain)), 2),
            "entropy_bytes": round(codec_wire.entropy_bytes(codes, codec.bits), 2),
            "raw_packed_bytes": math.ceil(codes[0].size * codec.bits / 8)}


def int8_payload_bytes(tokens: torch.Tensor, indices: torch.Tensor, num_patches: int) -> int:
    """Bytes of one int8-token payload (runtime/codec.py) of the first image: its size is fixed."""
    from ..runtime.codec import encode, quantize_int8

    t = tokens[:1].numpy()
    q, scales = quantize_int8(t)
    return len(encode(q, indices[:1].numpy(), model_id=EVAL_MODEL_ID, keep_ratio=0.0,
                      num_patches=num_patches, token_dtype="int8", scales=scales))


def plot_rate(rows: list[dict], path, title: str = "") -> None:
    """Top-1 against mean payload bytes (log x): one curve per image codec and per keep ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runtime.band import log_axes

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    styles = {"jpeg": ("tab:red", "s"), "webp": ("tab:green", "^"), "avif": ("tab:purple", "v")}
    for fmt, (color, mk) in styles.items():
        pts = sorted((r["payload_bytes"], 100 * r["top1"], r["quality"]) for r in rows if r["method"] == fmt)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=mk, color=color, lw=1.2, label=f"{fmt} (q)")
            for b, t, q in pts:
                ax.annotate(f"q{q}", (b, t), fontsize=6, color=color, xytext=(2, -8), textcoords="offset points")
    colors = {1.0: "black", 0.5: "tab:blue", 0.25: "tab:orange"}
    merc = [r for r in rows if r["method"] == "mercury"]
    for keep in sorted({r["keep_ratio"] for r in merc}, reverse=True):
        pts = sorted((r["payload_bytes"], 100 * r["top1"], r["codec"]) for r in merc
                     if r["keep_ratio"] == keep and r["codec"])
        color = colors.get(keep, "gray")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, lw=2.2,
                    label=f"mercury keep {keep:g} + codec")
            for b, t, c in pts:
                ax.annotate(c, (b, t), fontsize=6, color=color, xytext=(3, 3), textcoords="offset points")
        for r in merc:
            if r["keep_ratio"] == keep and not r["codec"]:
                ax.plot(r["payload_bytes"], 100 * r["top1"], marker="D", color=color, ls="none",
                        mfc="white", label=f"mercury keep {keep:g}, int8 tokens")
    for r in rows:
        if r["method"] == "vanilla":
            ax.axhline(100 * r["top1"], color="black", ls="--", lw=0.8,
                       label=f"vanilla on the stored images ({r['payload_bytes']:.0f} B)")
    log_axes(ax, "mean bytes on the wire per image (log)", "top-1 (%)", title, legend_size=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
