"""Codec heads and tails of an export (`export --codec DxB` or `--codec eP`, docs/FORMAT.md).

For every keep ratio and codec: the codec (the checkpoint's own when it was calibrated with
that codec in the loop, else fit here on real calibration images), its head graph
`head_k{K}_c{name}.onnx` (images -> codes, indices), its tail graph `tail_k{K}_c{name}.onnx`
(codes, indices -> logits), the zstd dictionary trained on the wire payloads of the
calibration images (formats/codec_wire.py) or, for an entropy codec eP, its per-channel tables
(formats/entropy.py), and the manifest entry with the codec id (codec_wire.codec_id: model id,
d x b, the sha256 of basis + means + ranges (+ centroids), and the dictionary's sha256).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from . import graphs as G
from .convert import ExportError, check_static_head, export_onnx
from .images import load_images


@torch.no_grad()
def head_outputs(m, images: np.ndarray, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [m.forward_head(torch.from_numpy(images[s: s + batch])) for s in range(0, len(images), batch)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def export_codecs(models, variants: list[dict], names: list[str], tmp: Path, x: torch.Tensor,
                  cal_dir: Path, codec_images: int, opset: int, dynamo: bool, log, model_id: str) -> dict:
    """Write the codec graphs of every variant into tmp; add v["codecs"]. Returns
    {(K, name): codec} for validation."""
    from ..formats import codec_wire
    from ..models.codec import codec_bytes, fit_named

    cfg = models[0].cfg
    h, w = models[0].backbone.patch_embed.img_size
    try:
        cal_x, _ = load_images(cal_dir, codec_images, (h, w), cfg.mean, cfg.std)
    except FileNotFoundError as e:
        raise ExportError(f"codec calibration images: {e}") from e
    fitted = {}
    for m, v in zip(models, variants):
        k = m.keep
        v["codecs"] = []
        tok, idx = head_outputs(m, cal_x)                                # (M, P+K, D), (M, K)
        for name in names:
            if m.codec is not None and m.codec.name == name:
                codec, origin = m.codec, "checkpoint (calibrated with this codec in the loop)"
            else:
                codec = fit_named(tok, idx, m.num_patches, name)
                origin = f"fit on {len(cal_x)} images of {cal_dir}"
            d, b, entropy = codec.dims, codec.bits, codec.entropy is not None
            log(f"  K={k} codec {name}: {origin}, {d} channels, variance kept {codec.variance_kept:.4f}")
            tag = f"k{k}_c{name}"
            head_f, tail_f = f"head_{tag}.onnx", f"tail_{tag}.onnx"
            with torch.no_grad():
                tok2, idx2 = m.forward_head(x)
                codes2 = codec.encode(tok2, idx2)
            g = export_onnx(G.CodecHead(m, codec), (x,), tmp / head_f, *G.CODEC_HEAD_IO, opset=opset, dynamo=dynamo)
            check_static_head(g)
            export_onnx(G.CodecTail(m, codec), (codes2, idx2), tmp / tail_f, *G.CODEC_TAIL_IO, opset=opset,
                        dynamo=dynamo)
            dictionary = codec_wire.train_dictionary(codec.encode(tok, idx).numpy(), b, entropy)   # calibration codes
            dict_f = f"codec_k{k}_{name}.{'tables' if entropy else 'zdict'}"
            (tmp / dict_f).write_bytes(dictionary)
            dict_entry = {"file": dict_f, "sha256": hashlib.sha256(dictionary).hexdigest()}
            basis_sha = hashlib.sha256(codec_bytes(codec)).hexdigest()
            v["codecs"].append({
                "name": name, "dims": d, "bits": b, "kind": "entropy" if entropy else "fixed",
                "codec_id": codec_wire.codec_id(model_id, d, b, basis_sha, dict_entry["sha256"]),
                "head": {"file": head_f}, "tail": {"file": tail_f}, "basis_sha256": basis_sha,
                "dictionary": dict_entry, "variance_kept": round(float(codec.variance_kept), 6),
                "num_prefix": codec.num_prefix, "mean": codec.mean_mode,
                "projection_flops": codec.extra_flops(k), "origin": origin})
            fitted[(k, name)] = codec
    return fitted
