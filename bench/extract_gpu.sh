#!/usr/bin/env bash
# Extraction on one GPU (issue 12.3): images/s of one backbone (ResNet-50, ViT-B/16) and of 14 backbones per pass,
# through the PIL path and the decoded-copy path, each against the pure forward rate measured in the same run.
# Plain python3 with torch, torchvision, pillow, numpy (nothing else imported); about 2 minutes on one H200 + 16 cores
# (each run is capped: 120 + 120 + 150 s at most).
#
#   PHOTOS=.bench_photos OUT=/tmp/gpu_check bash bench/extract_gpu.sh
#
# PHOTOS: a folder of JPEG photos (the 20 foolbox ImageNet ones); without it, random-content JPEGs (slower to decode).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
PHOTOS=${PHOTOS:-.bench_photos}
[ -d "$PHOTOS" ] || PHOTOS=""
WORKERS=${WORKERS:-14}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quiet() { tr '\r' '\n' | grep -v -e 'img/s' -e 'it/s' -e '^$'; }
echo "== extraction, one backbone per pass (PIL path on 4096 images, decoded copy on 16384)"
for arch in resnet50 vit_b_16; do
  timeout 120 "$PY" -m bench.bench_extract --arch "$arch" --decode pil cache --n_images 16384 --pil_images 4096 \
    --batch_size 256 --forward_batches 20 --workers "$WORKERS" ${PHOTOS:+--photos "$PHOTOS"} 2>&1 | quiet \
    | tee "$OUT/extract_$arch.txt"
done
echo "== extraction, 14 backbones per pass (PIL path on 2048 images, decoded copy on 4096)"
timeout 150 "$PY" -m bench.bench_extract --many 14 --decode pil cache --n_images 4096 --pil_images 2048 \
  --batch_size 128 --forward_batches 8 --workers "$WORKERS" ${PHOTOS:+--photos "$PHOTOS"} 2>&1 | quiet \
  | tee "$OUT/extract_many14.txt"
