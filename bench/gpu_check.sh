#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (python3 there holds torch, torchvision, timm, scikit-*).
# Sections (all by default): topk (mask methods), heads / heads_bf16 / heads_seeds (the ImageNet-shaped sweep: fp32,
# bf16 features, 3 seeds stacked), heads_profile (where the ImageNet-shaped sweep's time goes, by region and CUDA
# kernel), heads_faithful (bench_heads' 20 000 x 2048 workload on CUDA against the original's loop: ratio and gaps),
# pipeline (the whole pipeline on CUDA, random resnet18 on a synthetic ImageFolder),
# finetune (bench/finetune_gpu.sh; carry data/finetune_gpu from its --prepare), extract (bench/extract_gpu.sh: 1 and
# 14 backbones per pass, PIL path and decoded copy; carry .bench_photos). Output goes to $OUT.
#
#   OUT=/tmp/gpu bash bench/gpu_check.sh                 # everything
#   OUT=/tmp/gpu bash bench/gpu_check.sh heads pipeline  # some sections
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quiet() { tr '\r' '\n' | grep -v -e 'epoch/s' -e 's/epoch' -e 'epoch]' -e 'img/s' -e 'it/s' -e '^$'; }
sections=${*:-topk heads heads_bf16 heads_seeds heads_profile heads_faithful pipeline finetune extract}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"

for s in $sections; do case $s in
topk)
  echo "== top-k masks, K = 200, 8 heads"
  timeout 60 "$PY" -m bench.bench_topk --batch 8192 65536 2>&1 | tee "$OUT/topk.txt" ;;
heads)
  echo "== ImageNet-shaped sweep: 1.28M x 2048, 1000 classes, 200 concepts, 8 ratios + probe, 30 epochs, batch 8192"
  timeout 150 "$PY" -m bench.bench_heads --imagenet --batch_size 8192 2>&1 | quiet | tee "$OUT/heads_imagenet.txt" ;;
heads_bf16)
  timeout 150 "$PY" -m bench.bench_heads --imagenet --batch_size 8192 --feature_dtype bfloat16 2>&1 | quiet \
    | tee "$OUT/heads_imagenet_bf16.txt" ;;
heads_seeds)
  timeout 150 "$PY" -m bench.bench_heads --imagenet --batch_size 8192 --seeds 3 2>&1 | quiet \
    | tee "$OUT/heads_imagenet_3seeds.txt" ;;
heads_profile)
  echo "== the ImageNet-shaped sweep by region and CUDA kernel (synchronised regions: the total exceeds 'heads')"
  timeout 240 "$PY" -m bench.profile_sweep --device cuda --imagenet --md "$OUT/profile_sweep_imagenet.md" 2>&1 \
    | quiet | tail -60 ;;
heads_faithful)
  echo "== the CPU bench's workload on CUDA: ours (fp32, bf16) vs the original's loop, 0 workers and our start"
  timeout 300 "$PY" -m bench.bench_heads --baselines workers0 our_start 2>&1 | quiet \
    | tee "$OUT/heads_faithful_cuda.txt" ;;
pipeline)
  echo "== the pipeline on CUDA (random resnet18, synthetic ImageFolder, 2 seeds)"
  "$PY" -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_image_folder; \
make_image_folder('/tmp/shapes', n_train=40, n_val=20)"
  PYTHON="$PY" timeout 240 bash scripts/run_pipeline.sh --dataset /tmp/shapes --backbone resnet18 --weights none \
    --images_per_class 3 --elements patches --n_concepts 20 --concept_types "prototype cluster end2end" \
    --epochs 5 --seeds "0 1" --library /tmp/lib --out /tmp/out --device cuda --workers 4 2>&1 | quiet \
    | tee "$OUT/pipeline_cuda.txt" ;;
finetune)
  PYTHON="$PY" OUT="$OUT" timeout 240 bash bench/finetune_gpu.sh ;;
extract)
  echo "== extraction vs pure forward (bench/extract_gpu.sh)"
  PYTHON="$PY" OUT="$OUT" PHOTOS="${PHOTOS:-.bench_photos}" bash bench/extract_gpu.sh ;;
*) echo "unknown section $s" >&2 ;;
esac; done
