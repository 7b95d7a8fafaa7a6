"""Ship a calibration of the reference backbone with the package (mercury_onnx/data/reference/).

    python benchmarks/ship_reference.py CHECKPOINT          # meta-parameters + calibration report
    python benchmarks/ship_reference.py --accuracy docs/results/accuracy.json
                                                            # record the committed 10,000-image top-1

CHECKPOINT is what `mercury-onnx calibrate ../shared/models/deit_tiny_patch4_32_cifar10.json ...`
wrote; its backbone must equal the reference weights byte for byte. `benchmarks/reproduce.sh
calibration` and `accuracy` call this; nothing in the shipped files is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mercury_onnx.models import reference, ship  # noqa: E402

BACKBONE = ROOT.parent / "shared" / "models" / "deit_tiny_patch4_32_cifar10.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="Mercury checkpoint from `mercury-onnx calibrate`")
    ap.add_argument("--backbone", default=str(BACKBONE))
    ap.add_argument("--accuracy", help="eval JSON (mercury-onnx eval --checkpoint reference --json) to record")
    a = ap.parse_args()
    if a.checkpoint:
        for p in ship.write(a.checkpoint, a.backbone):
            print(f"wrote {p.relative_to(ROOT)}")
    if a.accuracy:
        meta = reference.info()
        data = json.loads(Path(a.accuracy).read_text())
        if data.get("calibration") != meta["calibration"]:
            sys.exit(f"{a.accuracy} was not measured with the shipped calibration (its 'calibration' differs)")
        rel = Path(a.accuracy).resolve().relative_to(ROOT)
        meta["accuracy"] = {"file": str(rel), "dataset": data["dataset"], "images": data["images"],
                            "results": data["results"]}
        reference.META_JSON.write_text(json.dumps(meta, indent=1) + "\n")
        print(f"recorded {rel} in {reference.META_JSON.relative_to(ROOT)}: {reference.accuracy_line(meta)}")


if __name__ == "__main__":
    main()
