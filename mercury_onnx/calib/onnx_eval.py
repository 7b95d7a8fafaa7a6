"""Top-1 of an export folder's graphs under onnxruntime (docs/FORMAT.md): vanilla through
full.onnx, Mercury through head_k{K}.onnx -> tail_k{K}.onnx. Rows as evaluate.evaluate's.

Where the export has them, also the int8 variants through the same tail: the QDQ int8 head
(method `mercury-int8-head`) and the int8-token head (method `mercury`, `token_dtype`
"int8", tokens dequantised as tokens * scales, as serve-tail does)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .data import ImageSet


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def evaluate_onnx(export_dir: str | Path, images: ImageSet, keep_ratios: list[float] | None = None,
                  batch_size: int = 256, threads: int = 2, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from ..formats.manifest import load_manifest, variant

    export_dir = Path(export_dir)
    man = load_manifest(export_dir)
    size = tuple(man["preprocess"]["size"])
    if tuple(images.pre.size) != size:
        raise ValueError(f"the export takes {size} images, the data was prepared at {images.pre.size}")
    if man.get("classes") and list(man["classes"]) != list(images.classes):
        raise ValueError(f"class order of the data {images.classes} differs from the export's {man['classes']}")
    variants = man["variants"] if not keep_ratios else [variant(man, r) for r in keep_ratios]
    full = _session(export_dir / man["full"]["file"], threads)
    # (row, head session, tail session, int8 tokens?) for every graph pair to score
    pairs = []
    recon = man.get("reconstruction", "meta-local")
    for v in variants:
        tail = _session(export_dir / v["tail"]["file"], threads)
        row = {"method": "mercury", "pruning": "regional", "reconstruction": recon, "keep_ratio": float(v["keep_ratio"])}
        pairs.append((row, _session(export_dir / v["head"]["file"], threads), tail, False))
        if v.get("head_int8"):
            pairs.append(({**row, "method": "mercury-int8-head"},
                          _session(export_dir / v["head_int8"]["file"], threads), tail, False))
        if v.get("head_tok8"):
            pairs.append(({**row, "token_dtype": "int8"}, _session(export_dir / v["head_tok8"]["file"], threads),
                          tail, True))
    correct = np.zeros(1 + len(pairs), dtype=np.int64)
    for x, y in tqdm(images.batches(batch_size), total=math.ceil(len(images) / batch_size),
                     desc=f"eval onnx ({1 + len(pairs)} graph pairs)", disable=not progress):
        x, y = x.numpy().astype(np.float32), y.numpy()
        correct[0] += (full.run(["logits"], {"images": x})[0].argmax(-1) == y).sum()
        for j, (_, head, tail, tok8) in enumerate(pairs, start=1):
            if tok8:
                q, scales, indices = head.run(["tokens", "scales", "indices"], {"images": x})
                tokens = q.astype(np.float32) * scales
            else:
                tokens, indices = head.run(["tokens", "indices"], {"images": x})
            logits = tail.run(["logits"], {"tokens": tokens, "indices": indices})[0]
            correct[j] += (logits.argmax(-1) == y).sum()
    n = len(images)
    rows = [{"method": "vanilla", "pruning": "none", "reconstruction": "none", "keep_ratio": 1.0,
             "top1": float(correct[0]) / n}]
    for j, (row, _, _, _) in enumerate(pairs, start=1):
        rows.append({**row, "top1": float(correct[j]) / n})
    return rows
