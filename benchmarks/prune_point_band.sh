#!/usr/bin/env bash
# The band of constant uplink rates where Mercury beats mobile-only and cloud-only-jpeg (bench
# --band, Pi profile: modelled compute) for both prune points, no codec (fp16/int8 tokens),
# keep 0.25, DeiT-T/S/B at 224 from their names; the same traces and photos as
# benchmarks/codec_band.sh. JSON into docs/results/prune_point_band/; docs/results/prune_point.md.
#   bash benchmarks/prune_point_band.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-docs/results/prune_point_band}
SHARED=$(cd "$(dirname "$0")/../.." && pwd)/shared
PHOTOS=$SHARED/data/imagenet-sample
T="-t lte-static -t lte-walking -t lte-driving -t 5g-static -t 5g-walking -t 5g-driving"
T="$T -t mahimahi:ATT-LTE-driving-2016 -t mahimahi:TMobile-LTE-short -t mahimahi:Verizon-LTE-short"
mkdir -p "$OUT"
for name in tiny small base; do
  for point in block attn; do
    python -m mercury_onnx.cli bench --model "deit_${name}_patch16_224" -r 0.25 --prune-point $point --device pi $T \
      --requests 500 --images "$PHOTOS" --images-skip 250 --jpeg-images 64 --band \
      --json "$OUT/band_${point}_deit_${name}.json" | sed -n '/^Band/,$p'
  done
done
