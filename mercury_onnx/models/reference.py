"""The calibrated reference model, shipped with the package.

The reference backbone (DeiT-Tiny on CIFAR-10, ../shared/models/deit_tiny_patch4_32_cifar10.*)
stays where it is; the package ships only what calibration learned for it: the meta-parameters
of every calibrated keep ratio (mercury_onnx/data/reference/reference.safetensors, ~6.6 k
numbers per ratio) and a JSON with the method settings, the full calibration report, the
sha256 of the backbone weights they belong to, and the 10,000-image test top-1 measured with
them (docs/results/accuracy.json). `benchmarks/reproduce.sh calibration` regenerates both
files from the project's own `calibrate` command.

Names that select it, wherever a Mercury checkpoint is accepted:
- `reference`: the backbone from $MERCURY_REFERENCE_BACKBONE, else
  ../shared/models/deit_tiny_patch4_32_cifar10.json (relative to the working directory);
- `reference:PATH.json`: the backbone JSON at PATH.
The backbone's weights must hash to the recorded sha256; any other backbone is refused (its
meta-parameters would be meaningless). The CLI's export/eval/demo also switch to this
calibration when handed the reference backbone JSON itself (`shipped_source`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..cache_key import sha256_file
from .config import ConfigError, MercuryConfig

NAME = "reference"
DATA = Path(__file__).resolve().parents[1] / "data" / "reference"
META_JSON, META_WEIGHTS = DATA / "reference.json", DATA / "reference.safetensors"
DEFAULT_BACKBONE = Path("..") / "shared" / "models" / "deit_tiny_patch4_32_cifar10.json"


def is_reference_name(source) -> bool:
    s = str(source)
    return s == NAME or s.startswith(NAME + ":")


def info() -> dict:
    """The shipped JSON (format, config, keep_tokens, calibration, backbone, accuracy)."""
    try:
        return json.loads(META_JSON.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"the shipped reference calibration is missing or unreadable ({META_JSON}: {e}); "
                          "reinstall mercury-onnx or run benchmarks/reproduce.sh calibration") from e


def backbone_json(source: str = NAME) -> Path:
    """The backbone JSON a reference name points at."""
    s = str(source)
    if s.startswith(NAME + ":"):
        return Path(s[len(NAME) + 1:])
    return Path(os.environ.get("MERCURY_REFERENCE_BACKBONE", DEFAULT_BACKBONE))


def backbone_weights(path: Path) -> Path:
    weights = MercuryConfig.from_checkpoint_json(path).checkpoint
    if weights is None:
        raise ConfigError(f"no weights beside {path} (expected {path.with_suffix('.safetensors')})")
    return Path(weights)


def check_backbone(path: Path, meta: dict | None = None) -> Path:
    """The backbone JSON's weights file, if it hashes to the shipped sha256; else ConfigError."""
    meta = meta or info()
    want = meta["backbone"]["sha256"]
    if not path.exists():
        raise ConfigError(f"reference backbone not found at {path}: the shipped calibration needs the weights "
                          f"{meta['backbone']['file']} (sha256 {want[:16]}...); pass reference:PATH/TO/"
                          f"{meta['backbone']['json']} or set MERCURY_REFERENCE_BACKBONE")
    weights = backbone_weights(path)
    got = sha256_file(weights)
    if got != want:
        raise ConfigError(f"{weights} is not the reference backbone: its sha256 is {got[:16]}..., the shipped "
                          f"calibration belongs to {meta['backbone']['file']} with sha256 {want[:16]}...; "
                          f"meta-parameters do not transfer between backbones: calibrate this one with "
                          f"`mercury-onnx calibrate {path} TRAIN_DIR -r 0.5 -r 0.25 --out NAME`")
    return weights


def checkpoint_json(source: str = NAME) -> dict:
    """The shipped JSON as a Mercury checkpoint JSON, after checking the named backbone."""
    meta = info()
    check_backbone(backbone_json(source), meta)
    return meta


def load(source: str = NAME, keep_tokens: list[int] | None = None, **overrides) -> list:
    """Mercury wrappers for the shipped keep counts (or those asked for), sharing the backbone."""
    from safetensors.torch import load_file

    from .mercury import load_meta, models_sharing_backbone

    meta = info()
    path = backbone_json(source)
    check_backbone(path, meta)
    stored = meta["keep_tokens"]
    wanted = stored if keep_tokens is None else keep_tokens
    missing = [k for k in wanted if k not in stored]
    if missing:
        raise ConfigError(f"the shipped reference calibration has meta-parameters for K={stored}, not for "
                          f"K={missing}; calibrate those with `mercury-onnx calibrate {path} ...`")
    backbone_cfg = MercuryConfig.from_checkpoint_json(path)
    base = MercuryConfig.from_dict({**meta["config"], "checkpoint": backbone_cfg.checkpoint, **overrides})
    tensors = load_file(str(META_WEIGHTS))
    models = models_sharing_backbone(base, keep_tokens=wanted)
    for m, k in zip(models, wanted):
        load_meta(m, tensors, k)
        m.eval()
    return models


def shipped_source(source: str, keep_ratios: list[float] | None = None) -> str:
    """`reference:SOURCE` when SOURCE is a backbone JSON whose weights are the reference backbone
    and the shipped calibration covers keep_ratios; else SOURCE unchanged."""
    s = str(source)
    if not s.endswith(".json") or not Path(s).exists() or not META_JSON.exists():
        return s
    try:
        if json.loads(Path(s).read_text()).get("format") is not None:    # a Mercury checkpoint, not a backbone
            return s
        meta = info()
        weights = backbone_weights(Path(s))
        if sha256_file(weights) != meta["backbone"]["sha256"]:
            return s
    except (OSError, ValueError):
        return s
    if keep_ratios:
        n = meta["num_patches"]
        if any(MercuryConfig(keep_ratio=r).num_keep(n) not in meta["keep_tokens"] for r in keep_ratios):
            return s
    return f"{NAME}:{s}"


def use_shipped(source: str, keep_ratios: list[float] | None, echo=print) -> str:
    """shipped_source, saying so when it switches to the shipped calibration."""
    s = shipped_source(source, keep_ratios)
    if s != str(source):
        echo(f"{source} is the reference backbone: using the calibration shipped with the package "
             f"({META_JSON.name}; {accuracy_line()})")
    return s


def accuracy_line(meta: dict | None = None) -> str:
    """The committed 10,000-image test top-1 of the shipped calibration, in one line."""
    acc = (meta or info()).get("accuracy")
    if not acc:
        return "no committed test accuracy recorded"
    parts = [f"{r['method']} {'keep ' + format(r['keep_ratio'], 'g') + ' ' if r['method'] != 'vanilla' else ''}"
             f"{100 * r['top1']:.2f}%" for r in acc["results"]]
    return f"{acc['dataset']}, {acc['images']} images: " + ", ".join(parts)
