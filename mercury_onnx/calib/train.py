"""Train or fine-tune a timm backbone on an ImageFolder; save it as ../shared/models/*.json does.

AdamW, cosine schedule with linear warmup, label smoothing, random crop with padding +
horizontal flip (on uint8 batches in torch), bf16 autocast on CPUs with native bf16 (on
others it is many times slower than fp32, so it is off unless forced). `OUT.state.pt` holds
the optimizer, step and RNG state so `--resume` continues where a run stopped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.config import MercuryConfig
from ..models.loading import create_backbone
from .data import ImageSet, load_image_set, preprocess_for


@dataclass
class TrainSettings:
    epochs: float = 1.0
    steps: int | None = None          # wins over epochs
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05              # fraction of steps
    label_smoothing: float = 0.1
    pad: int | None = None            # random-crop padding; None = size // 8
    bf16: bool | None = None          # None = only where the CPU has native bf16
    seed: int = 0
    save_every: int = 200             # steps between resume states


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def augment(raw: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8, random crop after reflect padding + horizontal flip."""
    b, h, w, _ = raw.shape
    x = raw.permute(0, 3, 1, 2).float()                                   # (B, 3, H, W)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(b, 3, h, w + 2 * pad)
        x = torch.gather(x, 2, rows)
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(b, 3, h, w)
        x = torch.gather(x, 3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x.permute(0, 2, 3, 1).to(torch.uint8)


def lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.inference_mode()
def accuracy(model, images: ImageSet, batch_size: int = 256) -> float:
    model.eval()
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in images.batches(batch_size))
    return correct / max(1, len(images))


def train(cfg: MercuryConfig, data_dir: str | Path, out: str | Path, s: TrainSettings,
          resume: bool = False, images: int | None = None, eval_dir: str | Path | None = None,
          progress: bool = True, log=print) -> dict:
    """Train cfg's backbone on DATA_DIR; writes OUT.safetensors + OUT.json. Returns the JSON."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    out = Path(out).with_suffix("")
    state_path = out.with_suffix(".state.pt")
    torch.manual_seed(s.seed)
    model = create_backbone(cfg)
    pre = preprocess_for(model)
    data, _ = load_image_set(data_dir, pre, cfg.classes, count=images, seed=s.seed, progress=progress)
    n_out = model.get_classifier().out_features if hasattr(model.get_classifier(), "out_features") else None
    if n_out is not None and n_out != len(data.classes):
        raise ValueError(f"the model has {n_out} outputs but {data_dir} has {len(data.classes)} classes; "
                         f"pass --num-classes {len(data.classes)}")
    per_epoch = math.ceil(len(data) / s.batch_size)
    total = s.steps if s.steps is not None else max(1, round(s.epochs * per_epoch))
    warm = max(1, int(s.warmup * total))
    bf16 = cpu_has_bf16() if s.bf16 is None else s.bf16
    pad = pre.size[0] // 8 if s.pad is None else s.pad
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(s.seed)
    step, seconds, order = 0, 0.0, None
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"]), opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        step, seconds, order = st["step"], st["seconds"], st["order"]
        log(f"resumed at step {step} of {total}")

    def save_state():
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "step": step, "seconds": seconds, "order": order, "settings": asdict(s)}, state_path)

    model.train()
    t0 = time.time() - seconds
    bar = tqdm(total=total, initial=step, desc="train", disable=not progress)
    losses = []
    while step < total:
        pos = step % per_epoch
        if order is None or pos == 0:
            order = torch.randperm(len(data), generator=gen)
        sel = order[pos * s.batch_size: (pos + 1) * s.batch_size]
        x = data.normalise(augment(data.images[sel], pad, gen))
        for g in opt.param_groups:
            g["lr"] = s.lr * lr_at(step, total, warm)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), data.labels[sel], label_smoothing=s.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds = time.time() - t0
        if step % s.save_every == 0 or step == total:
            save_state()
    bar.close()
    model.eval()
    meta = {"timm_model": cfg.timm_model, "overrides": cfg.overrides, "classes": data.classes,
            "mean": list(pre.mean), "std": list(pre.std),
            "epochs_seen": round(step * s.batch_size / len(data), 2), "steps": step,
            "batch_size": s.batch_size, "lr": s.lr, "train_images": len(data),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "train_minutes": round(seconds / 60, 2),
            "device": f"{torch.get_num_threads()}-thread CPU, {'bf16 autocast' if bf16 else 'fp32'}"}
    if eval_dir is not None:
        test, _ = load_image_set(eval_dir, pre, data.classes, progress=progress)
        meta["test_top1"] = round(accuracy(model, test), 4)
        meta["test_images"] = len(test)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out.with_suffix(".safetensors")))
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta
