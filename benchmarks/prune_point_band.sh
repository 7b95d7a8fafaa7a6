#!/usr/bin/env bash
# The band of constant uplink rates where Mercury beats mobile-only and cloud-only-jpeg (bench
# --band, Pi profile: modelled compute) for both prune points, no codec (fp16/int8 tokens),
# keep 0.25, DeiT-T/S/B at 224 from their names; the same traces and photos as
# benchmarks/codec_band.sh. Then the same with codecs at the `attn` point: DeiT-T/S/B exported
# with --prune-point attn and codec_band.sh's codecs (fit on the first 250 photos), beside
# codec_band.sh's `block` codec bands (docs/results/codec_wire/band_codec_*.json).
# JSON into docs/results/prune_point_band/; docs/results/prune_point.md.
#   bash benchmarks/prune_point_band.sh [OUT_DIR] [EXPORTS_DIR]   (the exports take minutes each)
set -euo pipefail
OUT=${1:-docs/results/prune_point_band}; EXP=${2:-$(mktemp -d)}
cd "$(dirname "$0")/.."; SHARED=${SHARED:-../shared}   # relative: the JSON records paths as given
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
for m in t:tiny:32x4:64x4 s:small:64x4:128x4 b:base:128x4:64x4; do
  IFS=: read -r s name c1 c2 <<< "$m"
  [ -f "$EXP/attn_deit_$s/manifest.json" ] || python -m mercury_onnx.cli export "deit_${name}_patch16_224" \
    "$EXP/attn_deit_$s" -r 0.25 --prune-point attn --codec "$c1" --codec "$c2" --calib-data "$PHOTOS" \
    --codec-images 250 --validate-data "$PHOTOS" --validate-images 8 --threads 2
  python -m mercury_onnx.cli bench "$EXP/attn_deit_$s" --device pi $T --requests 500 --images "$PHOTOS" \
    --images-skip 250 --jpeg-images 64 --band --json "$OUT/band_attn_codec_deit_$name.json" | sed -n '/^Band/,$p'
done
