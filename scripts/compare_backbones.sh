#!/usr/bin/env bash
# Run the pipeline for several backbones and/or layers on one dataset, then one comparison report over every run:
# a Markdown + CSV table, the curves overlaid, and IIS against standard accuracy with Pearson/Spearman correlations.
#
#   bash scripts/compare_backbones.sh --models "efficientnet_lite0 efficientnet_lite0:blocks.5 resnet50" \
#        --dataset fashion_mnist --train_size 2000 --val_size 1000 --images_per_class 4 \
#        --concept_types "prototype cluster" --report outputs/reports/fashion_mnist
#
# Flags (defaults in brackets):
#   --models "..."      [efficientnet_lite0]  model_configs/ names, each optionally with :LAYER
#   --report DIR        [outputs/reports/<dataset>]
#   --out DIR           [outputs]
#   every other flag goes unchanged to scripts/run_pipeline.sh (see its --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
export IIS_COMPAT=off   # our flags only: the original code's dialect (utils/compat.py) is for its commands

models=efficientnet_lite0; report=""; out=outputs; dataset=fashion_mnist; elements=segments; concept_types=prototype
element_seed=0
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --models|--report|--out|--dataset|--elements|--concept_types|--element_seed)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      printf -v "${1#--}" '%s' "$2"; shift 2 ;;
    --*) [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      pass+=("$1" "$2"); shift 2 ;;
    *) echo "error: unexpected argument $1" >&2; exit 2 ;;
  esac
done
tag_data=$(basename "$dataset")
report=${report:-$out/reports/$tag_data}
tag_el=$elements; [ "$element_seed" != 0 ] && tag_el="${elements}_seed$element_seed"   # as run_pipeline.sh names it

# Dataset features first, one pass per split for every model/layer at once (each image decoded once, each backbone run
# once per batch with all its layers); the per-model pipelines below find them up to date.
flag() { local i; for ((i = 0; i < ${#pass[@]}; i += 2)); do
  [ "${pass[i]}" = "--$1" ] && { printf '%s' "${pass[i+1]}"; return 0; }; done; return 0; }
extract=(--dataset "$dataset" --out "$out/features/$tag_data/{model}/{split}")
for f in data_root backbone weights workers batch_size device; do
  v=$(flag "$f"); if [ -n "$v" ]; then extract+=("--$f" "$v"); fi
done
for split in train val; do
  echo "=== $split features of every model in one pass"
  n=$(flag "${split}_size")
  # shellcheck disable=SC2086  # one word per model
  "$PY" -m concept_extractor.dataset_feature_extractor --model_config $models "${extract[@]}" --split "$split" \
    --max_images "${n:-0}"
done

runs=()
for m in $models; do
  config=${m%%:*}; layer=""; [ "$m" != "$config" ] && layer=${m#*:}
  echo "=== $config${layer:+ at $layer}"
  bash scripts/run_pipeline.sh --model_config "$config" ${layer:+--layer "$layer"} --dataset "$dataset" \
    --elements "$elements" --element_seed "$element_seed" --concept_types "$concept_types" --out "$out" "${pass[@]}"
  bbname=$(flag backbone)
  tag_model=$("$PY" scripts/model_tag.py "${bbname:-$config}" --layer "$layer")   # as run_pipeline.sh names it
  for ct in $concept_types; do
    if [ "$ct" = text ]; then runs+=("$out/runs/$tag_data/$tag_model/text")
    else runs+=("$out/runs/$tag_data/$tag_model/${ct}_$tag_el"); fi
  done
done
"$PY" iis_computing.py "${runs[@]}" --report "$report" --plot "$report/curves.png"
