"""Token codec at 224 px on real photos: distortion and bytes against a q90 JPEG (issue 13, item 3).

    python benchmarks/codec_photos.py [--model deit_base_patch16_224] [--keep 0.25]
        [--dims 64 128 ...] [--bits 4 6] [--entropy 6 6.5 7] [--json docs/results/codec/photos_deit_b.json]

Model: a timm ViT with RANDOM weights (no trained 224-px weights exist here), so accuracy is
not measurable; distortion is. Photos: ../shared/data/imagenet-sample, resized (shorter side)
and center-cropped to 224 like runtime preprocessing; the first half (sorted names) fits the
codec (models/codec.py: per-position mean, PCA basis, ranges) and the zstd dictionary, the
second half is measured. Per measured photo:
- reference: the kept block-1 tokens X (1+K rows) and indices of the photo as stored;
- JPEG q90: the 224 crop re-encoded at q90, its block-1 tokens at the SAME kept positions:
  relative error ||X_jpeg - X||_F / ||X||_F, and the JPEG's bytes;
- codec DxB: ||decode(encode(X)) - X||_F / ||X||_F, and the payload bytes of
  formats/codec_wire.encode (header, mask, codes, trained dictionary);
- entropy codec eP (fit to P% error on the fit photos): the same, with its tables
  (formats/entropy.py) instead of the dictionary.
Every point also has its wire encode + decode time per photo (codec_wire.encode + decode, B = 1,
header, mask and CRC included; median and p99 over 3 passes; target <= 1 ms).
Means over photos. Target: at no more error than JPEG q90, payload <= 0.5x the q90 JPEG.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mercury_onnx.formats import codec_wire as w
from mercury_onnx.models.checkpoint import mercury_from_any
from mercury_onnx.models.codec import codec_bytes, fit_codec, fit_entropy_codec
from mercury_onnx.formats.images import resize_crop

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
DIMS = (64, 128, 256, 384, 512)
BITS = (4, 6)
ENTROPY = (6, 6.6, 7)


def photos() -> list[np.ndarray]:
    from PIL import Image

    files = sorted(f for f in PHOTOS.iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png"))
    return [np.asarray(resize_crop(Image.open(f).convert("RGB"), 224, 224), np.uint8) for f in files]


def jpeg(img: np.ndarray, q: int) -> tuple[np.ndarray, int]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    n = buf.tell()
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), np.uint8), n


@torch.inference_mode()
def block1(m, imgs: np.ndarray, batch: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-1 tokens (M, 1+N, D) and CLS attention of uint8 photos (M, 224, 224, 3); the
    attention is None when the score does not read it (the default similarity score)."""
    mean = torch.tensor(m.cfg.mean or (0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor(m.cfg.std or (0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    xs, att = [], []
    for s in range(0, len(imgs), batch):
        x = torch.from_numpy(imgs[s: s + batch]).permute(0, 3, 1, 2).float() / 255
        t, a = m.forward_prefix((x - mean) / std)
        xs.append(t), att.append(None if a is None else a.clone())
    return torch.cat(xs), (None if att[0] is None else torch.cat(att))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of ||a - b||_F / ||b||_F (per image over its 1+K token rows)."""
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).mean())


def position_means(tok: torch.Tensor, idx: torch.Tensor, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 CLS mean (D,) and per-position patch means (N, D) of kept tokens (M, 1+K, D) at
    positions idx (M, K): the means the codec subtracts (models/codec.py, mean='position')."""
    t = tok.double()
    d = t.shape[-1]
    s = torch.zeros(num_patches, d, dtype=torch.float64).index_add_(0, idx.flatten(), t[:, 1:].reshape(-1, d))
    n = torch.zeros(num_patches, dtype=torch.float64).index_add_(0, idx.flatten(),
                                                                 torch.ones(idx.numel(), dtype=torch.float64))
    return t[:, 0].mean(0), s / n.clamp(min=1)[:, None]


def centred(tok: torch.Tensor, idx: torch.Tensor, cls_mean: torch.Tensor, pos_mean: torch.Tensor):
    """(tokens - their means, the means), both float64 (M, 1+K, D)."""
    t = tok.double()
    mean = torch.cat([cls_mean.expand(len(t), 1, -1), pos_mean[idx]], 1)
    return t - mean, mean


def water_filling_bytes(tok: torch.Tensor, idx: torch.Tensor, num_patches: int, rel_err: float) -> dict:
    """Modelled, not a codec: the bytes per image a transform codec would need at `rel_err` if it
    reached the Gaussian rate-distortion function of these tokens (per-position mean removed,
    PCA, reverse water-filling: every principal channel quantised to the same error theta,
    channels below theta dropped, ideal entropy coding). It says whether allocating bits by
    variance could reach the target where uniform DxB codecs do not; practical scalar
    quantisers sit ~0.25 bit per coded channel above it."""
    t = tok.double()
    z, _ = centred(tok, idx, *position_means(tok, idx, num_patches))
    z = z.reshape(-1, z.shape[-1])                                         # (M*(1+K), D)
    lam = torch.linalg.eigvalsh(z.T @ z / len(z)).clamp(min=0).flip(0)      # (D,) per-token variances
    target = rel_err ** 2 * float((t ** 2).sum((1, 2)).mean()) / t.shape[1]   # MSE per token row
    lo, hi = 0.0, float(lam[0])
    for _ in range(100):                                                   # sum(min(lam, theta)) = target
        theta = (lo + hi) / 2
        lo, hi = (theta, hi) if float(lam.clamp(max=theta).sum()) < target else (lo, theta)
    coded = lam > theta
    bits = float(0.5 * torch.log2(lam[coded] / theta).sum())
    return {"theta": theta, "channels_coded": int(coded.sum()), "bits_per_token": round(bits, 1),
            "bytes_per_image": round(bits * t.shape[1] / 8, 1)}


def equal_step_at(tok_fit, idx_fit, tok_t, idx_t, num_patches: int, rel_err: float) -> dict:
    """Measured prototype, not a wire format: every one of the D principal channels quantised with
    ONE common step (what reverse water-filling prescribes: low-variance channels get few levels
    or none), the step bisected to `rel_err` on the measured photos, bytes = the code length under
    a static per-channel entropy coder whose tables come from the fit photos (cross-entropy,
    add-one smoothed), + header and mask. Bits go where the variance is, without a per-channel
    bit budget."""
    means = position_means(tok_fit, idx_fit, num_patches)                 # fit photos only
    zf, _ = centred(tok_fit, idx_fit, *means)
    zf = zf.reshape(-1, zf.shape[-1])
    _, basis = torch.linalg.eigh(zf.T @ zf / len(zf))                      # (D, D), columns
    zt, mean_t = centred(tok_t, idx_t, *means)
    pf, pt = zf @ basis, zt @ basis                                          # principal coordinates
    x = tok_t.double()

    def at(step):
        qt = torch.round(pt / step)
        err = rel((qt * step) @ basis.T + mean_t, x)
        qf = torch.round(pf / step).long()
        bits = 0.0
        for c in range(pf.shape[-1]):                                        # static coder per channel
            lo = int(min(qf[:, c].min(), qt[..., c].min()))
            hist = torch.bincount(qf[:, c] - lo, minlength=int(qt[..., c].max()) - lo + 1).double() + 1
            p = hist / hist.sum()
            bits -= float(torch.log2(p[(qt[..., c].long() - lo).flatten()]).sum())
        return err, bits / len(x) / 8

    lo, hi = 1e-4, 10.0
    for _ in range(30):                                                      # geometric bisection on the step
        step = (lo * hi) ** 0.5
        err, nbytes = at(step)
        lo, hi = (step, hi) if err < rel_err else (lo, step)
    err, nbytes = at(lo)
    return {"step": round(lo, 6), "token_error": round(err, 5), "bytes_codes": round(nbytes, 1)}


def measure(c, tok_fit, idx_fit, tok_t, idx_t, num_patches: int, jpeg_bytes: float, jpeg_err: float) -> dict:
    """One codec's point: error and payload bytes on the measured photos (dictionary or tables
    trained on the fit photos' codes), and the wire's encode + decode time per photo."""
    codes = c.encode(tok_t, idx_t)
    err = rel(c.decode(codes, idx_t), tok_t)
    dic = w.train_dictionary(c.encode(tok_fit, idx_fit).numpy(), c.bits, c.entropy is not None)
    cid = w.codec_id("0" * 16, c.dims, c.bits, hashlib.sha256(codec_bytes(c)).hexdigest(),
                     hashlib.sha256(dic).hexdigest())
    cn, ix = codes.numpy(), idx_t.numpy()
    sizes, times = [], []
    for rep in range(3):                                        # 3 passes: the median is per photo and pass
        for i in range(len(cn)):
            t0 = time.perf_counter()
            data = w.encode(cn[i: i + 1], ix[i: i + 1], num_patches, c.bits, "0" * 16, cid, dic)
            w.decode(data, codec_id=cid, dictionary=dic)
            times.append(time.perf_counter() - t0)
            sizes += [len(data)] if rep == 0 else []
    wire_ms, wire_p99 = float(np.median(times)) * 1e3, float(np.percentile(times, 99)) * 1e3
    payload = float(np.mean(sizes))
    return {"codec": c.name, "dims": c.dims, "bits": c.bits, "variance_kept": round(c.variance_kept, 5),
            "token_error": round(err, 5), "payload_bytes": round(payload, 1),
            "entropy_bytes": round(w.entropy_bytes(cn, c.bits), 1), "wire_ms": round(wire_ms, 3),
            "wire_ms_p99": round(wire_p99, 3),
            "vs_jpeg_q90_bytes": round(payload / jpeg_bytes, 4), "error_le_jpeg_q90": err <= jpeg_err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--dims", type=int, nargs="*", default=DIMS)
    ap.add_argument("--bits", type=int, nargs="*", default=BITS)
    ap.add_argument("--entropy", type=float, nargs="*", default=ENTROPY, help="eP codecs: P in percent")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    (m,) = mercury_from_any(a.model, keep_ratios=[a.keep])
    imgs = np.stack(photos())
    half = len(imgs) // 2
    fit_imgs, test_imgs = imgs[:half], imgs[half:]
    x_fit, att_fit = block1(m, fit_imgs)
    tok_fit, idx_fit = m.prune(x_fit, att_fit)                           # (M, 1+K, D), (M, K)
    x_t, att_t = block1(m, test_imgs)
    tok_t, idx_t = m.prune(x_t, att_t)
    q90 = [jpeg(i, 90) for i in test_imgs]
    x_j, _ = block1(m, np.stack([j for j, _ in q90]))
    rows = torch.cat([torch.zeros(len(idx_t), 1, dtype=torch.long), idx_t + 1], 1)   # CLS + kept rows
    tok_j = torch.gather(x_j, 1, rows.unsqueeze(-1).expand(-1, -1, x_j.shape[-1]))
    jpeg_bytes = float(np.mean([n for _, n in q90]))
    jpeg_err = rel(tok_j, tok_t)
    int8_bytes = 40 + tok_t.shape[1] * (tok_t.shape[2] + 4) + 2 * idx_t.shape[1]
    print(f"{a.model} (random weights), keep {a.keep}: K={m.keep} of N={m.num_patches}, D={m.dim}; "
          f"fit on {half} photos, measured on {len(test_imgs)}")
    print(f"JPEG q90 of the 224 crop: {jpeg_bytes:.0f} B, token error {jpeg_err:.4f}; int8 tokens {int8_bytes} B")
    points = []
    for d in a.dims:
        if d > m.dim:
            continue
        for b in a.bits:
            c = fit_codec(tok_fit, idx_fit, m.num_patches, d, b)
            p = measure(c, tok_fit, idx_fit, tok_t, idx_t, m.num_patches, jpeg_bytes, jpeg_err)
            err, payload = p["token_error"], p["payload_bytes"]
            points.append(p)
            print(f"  {p['codec']:>6}: variance kept {p['variance_kept']:.4f}  error {err:.4f}  "
                  f"{payload:8.0f} B = {p['vs_jpeg_q90_bytes']:.3f}x JPEG q90"
                  f"{'  <= JPEG error' if err <= jpeg_err else ''}", flush=True)
    for pct in a.entropy:
        t1 = time.time()
        c = fit_entropy_codec(tok_fit, idx_fit, m.num_patches, pct / 100)
        fit_s = time.time() - t1
        p = measure(c, tok_fit, idx_fit, tok_t, idx_t, m.num_patches, jpeg_bytes, jpeg_err)
        p.update(fit_seconds=round(fit_s, 1), delta=round(c.delta, 6))
        points.append(p)
        print(f"  {p['codec']:>6}: {c.dims} channels, variance kept {p['variance_kept']:.5f}  error {p['token_error']:.4f}  "
              f"{p['payload_bytes']:8.0f} B = {p['vs_jpeg_q90_bytes']:.3f}x JPEG q90"
              f"{'  <= JPEG error' if p['error_le_jpeg_q90'] else ''}  (entropy {p['entropy_bytes']:.0f} B; "
              f"wire enc+dec {p['wire_ms']:.2f} ms; fit {fit_s:.0f} s)", flush=True)
    rd = water_filling_bytes(tok_fit, idx_fit, m.num_patches, jpeg_err)
    header_mask = 25 + (m.num_patches + 7) // 8
    rd["with_header_mask"] = round(rd["bytes_per_image"] + header_mask, 1)
    rd["vs_jpeg_q90_bytes"] = round(rd["with_header_mask"] / jpeg_bytes, 4)
    print(f"modelled bound (Gaussian rate-distortion of the fit photos' tokens at JPEG q90's error): "
          f"{rd['channels_coded']} channels, {rd['bits_per_token']:.0f} bits per token, "
          f"{rd['with_header_mask']:.0f} B with header and mask = {rd['vs_jpeg_q90_bytes']:.3f}x JPEG q90")
    eq = equal_step_at(tok_fit, idx_fit, tok_t, idx_t, m.num_patches, jpeg_err)
    eq["with_header_mask"] = round(eq["bytes_codes"] + header_mask, 1)
    eq["vs_jpeg_q90_bytes"] = round(eq["with_header_mask"] / jpeg_bytes, 4)
    print(f"measured prototype (one common step on all {m.dim} principal channels, per-channel static entropy "
          f"coder fit on the fit photos): error {eq['token_error']:.4f} at {eq['with_header_mask']:.0f} B "
          f"= {eq['vs_jpeg_q90_bytes']:.3f}x JPEG q90")
    ok = [p for p in points if p["error_le_jpeg_q90"]]
    best = min(ok, key=lambda p: p["payload_bytes"]) if ok else None
    print("smallest payload at <= JPEG q90's error: "
          + (f"{best['codec']} {best['payload_bytes']:.0f} B = {best['vs_jpeg_q90_bytes']:.3f}x JPEG q90 "
             f"(target <= 0.5x: {'met' if best['vs_jpeg_q90_bytes'] <= 0.5 else 'MISSED'})" if best else "none"))
    if a.json:
        out = {"model": a.model, "weights": "random (timm init, torch.manual_seed(0))", "keep_ratio": a.keep,
               "keep_tokens": m.keep, "num_patches": m.num_patches, "dim": m.dim,
               "photos": str(PHOTOS.name), "fit_photos": half, "measured_photos": len(test_imgs),
               "crop": "shorter side to 224 (bilinear), center crop 224", "jpeg_q90_bytes": round(jpeg_bytes, 1),
               "jpeg_q90_token_error": round(jpeg_err, 5), "int8_token_bytes": int8_bytes,
               "error": "mean over photos of ||X_hat - X||_F / ||X||_F over the CLS + K kept block-1 tokens",
               "points": points, "best_at_jpeg_error": best, "water_filling_at_jpeg_error": rd,
               "equal_step_at_jpeg_error": eq, "seconds": round(time.time() - t0, 1),
               "load_average_end": [round(x, 2) for x in os.getloadavg()]}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
