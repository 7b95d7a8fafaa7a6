"""`eval --codec` / `eval --rate-curve`: Mercury with token codecs, and the rate-accuracy rows.

codec_entries: for each keep ratio and codec, the ready model with its codec (the
checkpoint's own when it was calibrated with that codec, else fit on train images' head
outputs; never test images). At keep 1.0 (K = N, nothing pruned) the model has no fill:
that row is the codec alone. add_rate_rows: payload bytes on every row (calib/ratecurve.py)
and the image-codec rows.
"""
from __future__ import annotations

import numpy as np
import torch

from ..models.codec import fit_named
from .calibrate import head_outputs, run_prefix
from .data import load_image_set, preprocess_for
from .evaluate import Method, build_variant


def codec_entries(base, ready, stored_by_k: dict, names: list[str], keep_ratios: list[float], calib_dir: str,
                  images: int, seed: int, cache: bool, log=print) -> list[tuple]:
    """(Method mercury, keep ratio, model, codec) for every keep ratio x codec."""
    merc = {r: m for meth, r, m, *_ in ready if meth.name == "mercury"}
    cal, _ = load_image_set(calib_dir, preprocess_for(base), base.cfg.classes, count=images, seed=seed + 100,
                            cache=cache)
    pre = run_prefix(base, cal)
    out = []
    for r in keep_ratios:
        m = merc.get(r) or build_variant(base, Method("mercury", "regional", "duplicate"), r)
        if m is None or (r not in merc and m.keep < m.num_patches):
            log(f"skip codecs at keep ratio {r}: no Mercury model there")
            continue
        own, m.codec = m.codec, None
        tok, idx = head_outputs(m, pre)                                  # (M, P+K, D), (M, K)
        m.codec = own
        for name in names:
            if own is not None and own.name == name:
                codec, how = own, "the checkpoint's (calibrated with it in the loop)"
            else:
                codec, how = fit_named(tok, idx, m.num_patches, name), f"fit on {len(cal)} train images"
            codec.calib_codes = codec.encode(tok, idx).numpy()          # the dictionary's training data
            log(f"keep {r:g} K={m.keep} codec {name}: {how}, variance kept {codec.variance_kept:.4f}")
            out.append((Method("mercury", "regional", m.cfg.reconstruction), r, m, codec))
    return out


def stored_mean_bytes(data_dir: str, classes, count: int | None, seed: int) -> float:
    """Mean file size of the evaluated (stored) test images, chosen as load_image_set does."""
    from .data import choose, list_images

    paths, labels, _ = list_images(data_dir, classes)
    return float(np.mean([paths[i].stat().st_size for i in choose(labels, count, seed, True)]))


@torch.inference_mode()
def add_rate_rows(base, ready, rows: list[dict], codes: dict, test, data_dir: str, formats: dict,
                  batch_size: int, images: int | None = None, seed: int = 0, log=print) -> list[dict]:
    from .ratecurve import codec_dictionary, codec_payloads, image_codec_rows, int8_payload_bytes

    out = []
    for j, row in enumerate(rows):
        row = {"method": row["method"], "keep_ratio": row["keep_ratio"], "codec": row.get("codec"),
               "quality": None, **{k: v for k, v in row.items() if k not in ("method", "keep_ratio", "codec")}}
        if row["method"] == "vanilla":
            row["payload_bytes"] = round(stored_mean_bytes(data_dir, base.cfg.classes, images, seed), 2)
            row["payload"] = "stored test image files (JPEG)"
        elif row.get("codec"):
            _, _, m, codec = ready[j - 1]
            dictionary, cid = codec_dictionary(codec, codec.calib_codes)
            row.update(codec_payloads(*codes[j], m.num_patches, codec, dictionary, cid))
            row["variance_kept"] = round(float(codec.variance_kept), 6)
            row["payload"] = "formats/codec_wire.py, one image per payload, trained dictionary"
        elif row["method"] == "mercury":
            m = ready[j - 1][2]
            x, attn = base.forward_prefix(test.normalise(test.images[:1]))
            row["payload_bytes"] = int8_payload_bytes(*m.prune(x, attn.clone()), m.num_patches)
            row["payload"] = "runtime/codec.py int8 tokens + scales + int16 indices"
        out.append(row)
    return out + image_codec_rows(base.backbone, test, formats, batch_size, log=log)
