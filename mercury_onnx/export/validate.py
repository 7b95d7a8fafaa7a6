"""Validate an export folder against PyTorch on real images: ORT vs torch per output.

What is compared (every number lands in manifest["validation"]):
- full.logits, head_kK.tokens, tail_kK.logits: max |ORT - torch|, must be <= atol * max(1, max|torch|)
  (atol 1e-4 for float32 graphs). The tail is fed torch's head outputs, so it is checked on
  its own; tokens are compared on the rows whose indices agree.
- head_kK.indices: the fraction of images whose K indices are identical (>= min_index_rows;
  near-ties in the scores may flip one pick between two float implementations).
- kK end to end (ORT head -> ORT tail) vs torch Mercury: top-1 agreement (>= min_top1), and
  accuracy on labelled images (CIFAR-10 for the reference model).
- Codec heads/tails (head_kK_cDxB): ORT codes within one quantisation step of torch's codes
  on the rows whose indices agree (|ORT - torch| <= 1: a rounding tie may go either way);
  the codec tail fed torch's codes within atol of the torch codec pipeline's logits; ORT
  codec head -> ORT codec tail top-1 agreement with the torch codec pipeline (>= min_top1).
- Lossy variants against the fp32 pipeline: head_kK_tok8 (int8 tokens; the dequantised tokens
  must be within scale/2 of torch's), head_kK_tok16, tail_kK_fp16: top-1 agreement
  (>= min_top1_lossy); head_kK_int8 (>= min_top1_int8, its indices may differ: quantised
  scores re-rank near-ties); accuracies of each on labelled images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


@dataclass
class Tolerances:
    atol_fp32: float = 1e-4          # float32 graphs, scaled by max(1, max|torch output|)
    atol_fp16: float = 2e-2          # fp16 tail logits and tok16 tokens (relative the same way)
    min_index_rows: float = 0.98     # images whose K indices equal torch's
    min_top1: float = 0.99           # fp32 ORT split vs torch Mercury
    min_top1_lossy: float = 0.90     # int8 / fp16 tokens, fp16 tail vs the fp32 pipeline
    min_top1_int8: float = 0.85      # int8 (QDQ) head vs the fp32 pipeline: a lossy model by design


def session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _batches(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _run(sess, feeds_list):
    outs = [sess.run(None, feeds) for feeds in feeds_list]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _scale(b: np.ndarray) -> float:
    """Tolerances are absolute up to |output| = 1 and relative beyond."""
    return max(1.0, float(np.abs(b).max()))


def _acc(logits: np.ndarray, labels) -> float | None:
    return None if labels is None else round(float((logits.argmax(-1) == labels).mean()), 4)


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4)


def validate_export(export_dir: str | Path, models, variants: list[dict], full_file: str,
                    images: np.ndarray, labels: np.ndarray | None, tol: Tolerances | None = None,
                    threads: int = 1, batch: int = 16, codecs: dict | None = None) -> dict:
    """models: the Mercury wrappers, in the order of variants (manifest entries);
    codecs: {(K, name): TokenCodec} of the variants' codec graphs."""
    tol = tol or Tolerances()
    d = Path(export_dir)
    n = len(images)
    slices = _batches(n, batch)   # the last batch is smaller: the dynamic batch axis is exercised
    diff, agree, acc, rows, fails = {}, {}, {}, {}, []

    def check(name, value, limit, above=False):
        ok = value >= limit if above else value <= limit
        if not ok:
            fails.append(f"{name}: {value:.6g} {'<' if above else '>'} {limit}")

    x_feeds = [{"images": images[s]} for s in slices]
    with torch.no_grad():
        x_t = torch.from_numpy(images)
        ref_full = torch.cat([models[0].backbone(x_t[s]) for s in slices]).numpy()
    (full,) = _run(session(d / full_file, threads), x_feeds)
    diff["full.logits"] = _max_diff(full, ref_full)
    check("full.logits max diff", diff["full.logits"], tol.atol_fp32 * _scale(ref_full))
    agree["full"] = _agree(full, ref_full)
    acc["torch.full"], acc["full"] = _acc(ref_full, labels), _acc(full, labels)

    for m, v in zip(models, tqdm(variants, desc="validate", leave=False)):
        k, key = v["keep_tokens"], f"k{v['keep_tokens']}"
        head_f, tail_f = v["head"]["file"], v["tail"]["file"]
        with torch.no_grad():
            outs = [m.forward_head(x_t[s]) for s in slices]
            tok_t = torch.cat([o[0] for o in outs]).numpy()
            idx_t = torch.cat([o[1] for o in outs]).numpy()
            logit_t = torch.cat([m.forward_tail(*o) for o in outs]).numpy()
        acc[f"torch.{key}"] = _acc(logit_t, labels)

        tok, idx = _run(session(d / head_f, threads), x_feeds)
        same = (idx == idx_t).all(-1)                                   # (n,)
        rows[f"{head_f}.indices"] = round(float(same.mean()), 4)
        check(f"{head_f} identical index rows", rows[f"{head_f}.indices"], tol.min_index_rows, above=True)
        if idx.shape != (n, k) or tok.shape != tok_t.shape or tok.dtype != np.float32:
            fails.append(f"{head_f}: outputs {tok.shape} {tok.dtype}, {idx.shape}; expected {tok_t.shape}, ({n}, {k})")
        elif same.any():
            diff[f"{head_f}.tokens"] = _max_diff(tok[same], tok_t[same])
            check(f"{head_f} tokens max diff", diff[f"{head_f}.tokens"], tol.atol_fp32 * _scale(tok_t[same]))

        tail = session(d / tail_f, threads)
        t_feeds = [{"tokens": tok_t[s], "indices": idx_t[s]} for s in slices]
        (logit_tail,) = _run(tail, t_feeds)
        diff[f"{tail_f}.logits"] = _max_diff(logit_tail, logit_t)
        check(f"{tail_f} logits max diff", diff[f"{tail_f}.logits"], tol.atol_fp32 * _scale(logit_t))

        (split,) = _run(tail, [{"tokens": tok[s], "indices": idx[s]} for s in slices])
        agree[key] = _agree(split, logit_t)
        acc[key] = _acc(split, labels)
        check(f"{key} ORT head->tail top-1 agreement with torch", agree[key], tol.min_top1, above=True)

        for c in v.get("codecs") or []:
            _check_codec(d, m, (codecs or {})[(k, c["name"])], c, key, x_t, x_feeds, slices, idx_t, labels,
                         tol, threads, diff, agree, acc, rows, fails, check)

        if v.get("head_tok8"):
            f = v["head_tok8"]["file"]
            q, scales, idx8 = _run(session(d / f, threads), x_feeds)
            same8 = (idx8 == idx_t).all(-1)
            rows[f"{f}.indices"] = round(float(same8.mean()), 4)
            deq = q.astype(np.float32) * scales
            if q.dtype != np.int8:
                fails.append(f"{f}: tokens are {q.dtype}, expected int8")
            elif same8.any():
                # rounding error is at most half a step; allow float slack of the fp32 head
                err = np.abs(deq[same8] - tok_t[same8]) - 0.5 * scales[same8]
                diff[f"{f}.dequant_minus_half_step"] = float(err.max())
                check(f"{f} dequantised tokens beyond scale/2", float(err.max()),
                      tol.atol_fp32 * max(1.0, float(np.abs(tok_t).max())))
            (lg,) = _run(tail, [{"tokens": deq[s], "indices": idx8[s]} for s in slices])
            agree[f"{key}_tok8"], acc[f"{key}_tok8"] = _agree(lg, split), _acc(lg, labels)
            check(f"{f} top-1 agreement with fp32", agree[f"{key}_tok8"], tol.min_top1_lossy, above=True)

        if v.get("head_tok16"):
            f = v["head_tok16"]["file"]
            t16, idx16 = _run(session(d / f, threads), x_feeds)
            same16 = (idx16 == idx_t).all(-1)
            rows[f"{f}.indices"] = round(float(same16.mean()), 4)
            if t16.dtype != np.float16:
                fails.append(f"{f}: tokens are {t16.dtype}, expected float16")
            elif same16.any():
                diff[f"{f}.tokens"] = _max_diff(t16[same16], tok_t[same16])
                check(f"{f} tokens max diff", diff[f"{f}.tokens"], tol.atol_fp16 * _scale(tok_t[same16]))
            (lg,) = _run(tail, [{"tokens": t16[s].astype(np.float32), "indices": idx16[s]} for s in slices])
            agree[f"{key}_tok16"], acc[f"{key}_tok16"] = _agree(lg, split), _acc(lg, labels)
            check(f"{f} top-1 agreement with fp32", agree[f"{key}_tok16"], tol.min_top1_lossy, above=True)

        if v.get("head_int8"):
            f = v["head_int8"]["file"]
            t8, i8 = _run(session(d / f, threads), x_feeds)
            rows[f"{f}.indices"] = round(float((i8 == idx_t).all(-1).mean()), 4)
            (lg,) = _run(tail, [{"tokens": t8[s], "indices": i8[s]} for s in slices])
            agree[f"{key}_int8"], acc[f"{key}_int8"] = _agree(lg, split), _acc(lg, labels)
            check(f"{f} top-1 agreement with fp32", agree[f"{key}_int8"], tol.min_top1_int8, above=True)

        if v.get("tail_fp16"):
            f = v["tail_fp16"]["file"]
            try:
                (lg,) = _run(session(d / f, threads), [{"tokens": tok_t[s].astype(np.float16),
                                                        "indices": idx_t[s]} for s in slices])
            except Exception as e:   # ORT CPU lacks some fp16 kernels: then unverified here
                diff[f"{f}.logits"] = None
                rows[f"{f}.unverified"] = f"ORT CPU could not run it: {str(e).splitlines()[0][:200]}"
            else:
                diff[f"{f}.logits"] = _max_diff(lg.astype(np.float32), logit_t)
                check(f"{f} logits max diff", diff[f"{f}.logits"], tol.atol_fp16 * _scale(logit_t))
                agree[f"{key}_fp16"] = _agree(lg, logit_t)
                acc[f"{key}_fp16"] = _acc(lg.astype(np.float32), labels)
                check(f"{f} top-1 agreement with torch", agree[f"{key}_fp16"], tol.min_top1_lossy, above=True)

    return {"images": n, "labelled": labels is not None, "tolerances": asdict(tol),
            "codes": "|ORT - torch| <= 1 quantisation step on rows with identical indices",
            "atol": {"float32": tol.atol_fp32, "float16": tol.atol_fp16,
                     "int8_tokens": "scale/2 per token (+ the float32 atol)",
                     "rule": "max|ort - torch| <= atol * max(1, max|torch|)"},
            "max_abs_diff": diff, "identical_index_rows": rows, "top1_agreement": agree,
            "accuracy": acc, "failures": fails, "passed": not fails}


def _check_codec(d, m, codec, c, key, x_t, x_feeds, slices, idx_t, labels, tol, threads,
                 diff, agree, acc, rows, fails, check):
    """One codec head/tail pair against the torch codec pipeline (see the module docstring)."""
    head_f, tail_f, ck = c["head"]["file"], c["tail"]["file"], f"{key}_c{c['name']}"
    with torch.no_grad():
        outs = [m.forward_head(x_t[s]) for s in slices]
        codes_t = torch.cat([codec.encode(*o) for o in outs])
        logit_t = torch.cat([m.forward_tail(codec.decode(codec.encode(*o), o[1]), o[1]) for o in outs]).numpy()
    codes_t = codes_t.numpy()
    acc[f"torch.{ck}"] = _acc(logit_t, labels)
    codes, idx = _run(session(d / head_f, threads), x_feeds)
    same = (idx == idx_t).all(-1)
    rows[f"{head_f}.indices"] = round(float(same.mean()), 4)
    check(f"{head_f} identical index rows", rows[f"{head_f}.indices"], tol.min_index_rows, above=True)
    if codes.dtype != np.uint8 or codes.shape != codes_t.shape:
        fails.append(f"{head_f}: codes {codes.shape} {codes.dtype}, expected {codes_t.shape} uint8")
        return
    if same.any():
        step = np.abs(codes[same].astype(np.int16) - codes_t[same].astype(np.int16))
        diff[f"{head_f}.codes_steps"] = int(step.max())
        rows[f"{head_f}.codes_equal"] = round(float((step == 0).mean()), 6)
        check(f"{head_f} codes max steps from torch", int(step.max()), 1)
    tail = session(d / tail_f, threads)
    (lg,) = _run(tail, [{"codes": codes_t[s], "indices": idx_t[s]} for s in slices])
    diff[f"{tail_f}.logits"] = _max_diff(lg, logit_t)
    check(f"{tail_f} logits max diff", diff[f"{tail_f}.logits"], tol.atol_fp32 * _scale(logit_t))
    (split,) = _run(tail, [{"codes": codes[s], "indices": idx[s]} for s in slices])
    agree[ck], acc[ck] = _agree(split, logit_t), _acc(split, labels)
    check(f"{ck} ORT codec head->tail top-1 agreement with torch", agree[ck], tol.min_top1, above=True)
