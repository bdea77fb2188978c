#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (python3 there holds torch, torchvision, timm, scikit-*):
# the ImageNet-shaped head sweep, the original-vs-ours sweep, extraction vs pure forward, and the pipeline on CUDA.
#
#   OUT=/tmp/gpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quiet() { grep -v -e 'epoch/s' -e 'epoch]' -e 'img/s' -e 'it/s'; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"

echo "== 1. ImageNet-shaped sweep: 1.28M x 2048, 1000 classes, 200 concepts, 8 ratios + probe, 30 epochs"
"$PY" -m bench.bench_heads --imagenet 2>&1 | quiet | tee "$OUT/heads_imagenet.txt"
"$PY" -m bench.bench_heads --imagenet --feature_dtype bfloat16 --batch_size 8192 2>&1 | quiet \
  | tee "$OUT/heads_imagenet_bf16_8192.txt"
echo "== 2. original-style vs ours, 20k x 2048, on the GPU"
"$PY" -m bench.bench_heads --epochs 5 --workers 4 2>&1 | quiet | tee "$OUT/heads_20k.txt"
echo "== 3. extraction vs pure forward: 1 and 14 backbones per pass, PIL path and decoded copy (bench/extract_gpu.sh)"
# PHOTOS: a folder of JPEG photos (e.g. foolbox's 20 ImageNet ones, carried along); else random-content JPEGs
PYTHON="$PY" OUT="$OUT" PHOTOS="${PHOTOS:-.bench_photos}" bash bench/extract_gpu.sh
echo "== 4. the pipeline on CUDA (random resnet18, synthetic ImageFolder)"
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_image_folder; \
make_image_folder('/tmp/shapes', n_train=40, n_val=20)"
PYTHON="$PY" bash scripts/run_pipeline.sh --dataset /tmp/shapes --backbone resnet18 --weights none \
  --images_per_class 3 --elements patches --n_concepts 20 --concept_types "prototype cluster end2end" \
  --epochs 5 --library /tmp/lib --out /tmp/out --device cuda --workers 4 2>&1 | quiet | tee "$OUT/pipeline_cuda.txt"
