"""Calibrate several keep ratios in one run, each with its own distillation temperature.

The temperature of each keep ratio is either given (`--temperature`, one value for all ratios
or one per `-r`, in the same order) or chosen on the held-out train slice
(`--choose-temperature T` repeated: every candidate is calibrated from the same start, and the
one with the lowest held-out KL to the unpruned model, measured at T = 1 so candidates compare,
is kept). The report says, per keep ratio, which temperature was used and why, with the
held-out KL of every candidate: the checkpoint's JSON is the whole record of the recipe.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..models.mercury import Mercury
from .calibrate import CalibSettings, Prefixed, calibrate, distill_loss, head_outputs, tail_logits


def per_ratio_temperatures(temperatures: list[float], n_ratios: int) -> list[float]:
    """One temperature per keep ratio: a single value applies to all, else one per ratio."""
    if not temperatures:
        return [1.0] * n_ratios
    if len(temperatures) == 1:
        return temperatures * n_ratios
    if len(temperatures) != n_ratios:
        raise ValueError(f"--temperature given {len(temperatures)} times for {n_ratios} keep ratios: "
                         "give it once (all ratios) or once per -r, in the same order")
    if any(t <= 0 for t in temperatures):
        raise ValueError("temperatures must be > 0")
    return list(temperatures)


def heldout_kl(model: Mercury, pre: Prefixed) -> float:
    """KL(unpruned || model) at T = 1 on the held-out slice: comparable across temperatures."""
    tokens, idx = head_outputs(model, pre)
    return distill_loss(tail_logits(model, tokens, idx), pre.teacher, 1.0).item()


def calibrate_ratio(model: Mercury, train: Prefixed, s: CalibSettings, heldout: Prefixed | None,
                    candidates: list[float], progress: bool = True) -> dict:
    """Calibrate `model` (one keep ratio) at s.temperature, or at the best of `candidates`."""
    if not candidates:
        rep = calibrate(model, train, s, heldout=heldout, progress=progress)
        if heldout is not None:
            rep["heldout_kl_t1"] = heldout_kl(model, heldout)
        rep["temperature_choice"] = {"chosen": s.temperature, "by": "given (--temperature)"}
        return rep
    if heldout is None:
        raise ValueError("--choose-temperature needs a held-out slice (--heldout > 0)")
    start = copy.deepcopy(model.recon.state_dict())
    tried: dict[float, tuple[float, dict, dict]] = {}
    for t in candidates:
        model.recon.load_state_dict(start)
        rep = calibrate(model, train, replace(s, temperature=t), heldout=heldout, progress=progress)
        kl = heldout_kl(model, heldout)
        rep["heldout_kl_t1"] = kl
        tried[t] = (kl, rep, copy.deepcopy(model.recon.state_dict()))
    best = min(tried, key=lambda t: tried[t][0])
    kl, rep, state = tried[best]
    model.recon.load_state_dict(state)
    rep["temperature_choice"] = {
        "chosen": best, "by": f"lowest held-out KL at T=1 on {len(heldout)} held-out train images",
        "heldout_kl_t1": {str(t): round(tried[t][0], 6) for t in candidates}}
    return rep


def calibrate_all(models: list[Mercury], train: Prefixed, s: CalibSettings, heldout: Prefixed | None,
                  temperatures: list[float], candidates: list[float],
                  log: Callable[[str], None] = print, progress: bool = True) -> dict[str, dict]:
    """Calibrate every keep ratio (one model each, shared backbone); reports keyed by K."""
    temps = per_ratio_temperatures(temperatures, len(models))
    per_k = {}
    for m, t in zip(models, temps):
        rep = calibrate_ratio(m, train, replace(s, temperature=t), heldout, candidates, progress)
        per_k[str(m.keep)] = rep
        log(summary_line(m, rep))
    return per_k


def summary_line(m: Mercury, rep: dict) -> str:
    choice = rep["temperature_choice"]
    line = f"K={m.keep} (keep {m.keep / m.num_patches:g}), T={choice['chosen']:g}"
    if "heldout_kl_t1" in choice:
        line += " (held-out KL at T=1: " + ", ".join(f"T={t}: {kl:.4f}" for t, kl in choice["heldout_kl_t1"].items()) + ")"
    if "heldout_after" in rep:
        b, a = rep["heldout_before"], rep["heldout_after"]
        line += (f": held-out top-1 {100 * rep['heldout_untrained']['top1']:.2f}% untrained, "
                 f"{100 * b['top1']:.2f}% after init, {100 * a['top1']:.2f}% after {rep['steps']} steps "
                 f"(vanilla {100 * rep['heldout_vanilla_top1']:.2f}%); KL at T=1 {rep['heldout_kl_t1']:.4f}")
    return line


def run_parallel(child_argvs: list[list[str]], parts: list, log: Callable[[str], None] = print) -> None:
    """Run one `mercury-onnx calibrate` per keep ratio at once (independent: same images and
    seeds as a sequential run), each writing parts[i] (+ .log); raise RuntimeError on a failure."""
    import subprocess
    import sys
    import time

    procs = []
    for argv, part in zip(child_argvs, parts):
        Path(part).parent.mkdir(parents=True, exist_ok=True)
        f = open(f"{part}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "mercury_onnx.cli", "calibrate", *argv],
                                       stdout=f, stderr=subprocess.STDOUT), f, part))
        log(f"  started {' '.join(argv[argv.index('-r'):argv.index('-r') + 2])} (log {part}.log)")
    failed = []
    for p, f, part in procs:
        while p.poll() is None:
            time.sleep(5)
        f.close()
        if p.returncode != 0:
            failed.append(f"{part}.log (exit {p.returncode})")
    if failed:
        raise RuntimeError("a keep ratio's calibration failed: see " + ", ".join(failed))


def combine_parts(parts: list) -> tuple[list[Mercury], dict[str, dict]]:
    """The parts' models on one shared backbone, and their per-K reports."""
    from ..models.checkpoint import load_mercury, read_checkpoint_json
    from ..models.mercury import build_mercury

    models, per_k, backbone = [], {}, None
    for part in parts:
        (m,) = load_mercury(part)
        if backbone is None:
            backbone = m.backbone
        else:
            state = m.recon.state_dict()
            m = build_mercury(m.cfg, backbone)
            m.recon.load_state_dict(state)
        models.append(m)
        per_k.update(read_checkpoint_json(part)["calibration"]["per_keep_tokens"])
    return models, per_k
