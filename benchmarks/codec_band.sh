#!/usr/bin/env bash
# The band of constant uplink rates where Mercury is the fastest strategy (bench --band), Pi
# profile (modelled compute), RTT from the 9 real trace files; docs/results/codec_wire.md.
#   bash benchmarks/codec_band.sh EXPORTS_DIR [OUT_DIR]
# EXPORTS_DIR gets (once; each export takes minutes) the reference model and DeiT-T/S/B at 224
# with codecs fit on the first 250 photos of ../shared/data/imagenet-sample (random weights:
# latency only); bytes are measured on the other 250 (--images-skip 250).
set -euo pipefail
EXP=${1:?EXPORTS_DIR}; OUT=${2:-docs/results/codec_wire}
cd "$(dirname "$0")/.."; SHARED=${SHARED:-../shared}   # relative: the JSON records paths as given
PHOTOS=$SHARED/data/imagenet-sample
T="-t lte-static -t lte-walking -t lte-driving -t 5g-static -t 5g-walking -t 5g-driving"
T="$T -t mahimahi:ATT-LTE-driving-2016 -t mahimahi:TMobile-LTE-short -t mahimahi:Verizon-LTE-short"
CLI="python -m mercury_onnx.cli"
mkdir -p "$EXP" "$OUT"
[ -f "$EXP/ref/manifest.json" ] || $CLI export "$SHARED/models/deit_tiny_patch4_32_cifar10.json" "$EXP/ref" \
  -r 0.5 -r 0.25 --codec 16x4 --codec 24x4 --token-dtype int8 --validate-images 32
for m in t:tiny:32x4:64x4 s:small:64x4:128x4 b:base:128x4:64x4; do
  IFS=: read -r s name c1 c2 <<< "$m"
  [ -f "$EXP/deit_$s/manifest.json" ] || $CLI export "deit_${name}_patch16_224" "$EXP/deit_$s" -r 0.25 \
    --codec "$c1" --codec "$c2" --calib-data "$PHOTOS" --codec-images 250 --validate-data "$PHOTOS" \
    --validate-images 8 --threads 2
  # today: no codec (the same held-out photos for the JPEG sizes)
  $CLI bench --model "deit_${name}_patch16_224" -r 0.25 --device pi $T --requests 500 --images "$PHOTOS" \
    --images-skip 250 --jpeg-images 64 --band --json "$OUT/band_today_deit_$s.json" | sed -n '/^Band/,$p'
  $CLI bench "$EXP/deit_$s" --device pi $T --requests 500 --images "$PHOTOS" --images-skip 250 \
    --jpeg-images 64 --band --json "$OUT/band_codec_deit_$s.json" --plot-dir "$EXP/plots_deit_$s" | sed -n '/^Band/,$p'
  python benchmarks/codec_wire.py --export "$EXP/deit_$s" --data "$PHOTOS" --skip 250 --images 250 \
    --json "$OUT/gap_deit_$s.json"
done
$CLI bench "$EXP/ref" --device pi $T --requests 500 --jpeg-images 64 --band --json "$OUT/band_codec_ref.json" \
  --plot-dir "$EXP/plots_ref" | sed -n '/^Band/,$p'
python benchmarks/codec_wire.py --export "$EXP/ref" --data "$SHARED/data/cifar10/test" --skip 0 --images 1000 \
  --json "$OUT/gap_ref.json"
