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
#   --report DIR        [<out>/reports/<data>/<subset>/compare_<hash of its run folders>]
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
# every folder from the one naming rule (utils/layout.py, scripts/layout.py), as run_pipeline.sh names them
ask_layout() {  # ask_layout MODEL LAYER: sets L_<name> from scripts/layout.py (flags not given: its defaults)
  local k v f lay given=()
  for f in weights train_size val_size images_per_class library n_concepts epochs lrs seeds protocol select_on \
      clip_cutoff interpretability_cutoff clip_model clip_pretrained exclude_background floor_draws; do
    v=$(flag "$f"); if [ -n "$v" ]; then given+=("--$f" "$v"); fi
  done
  lay=$("$PY" scripts/layout.py --out "$out" \
    --dataset "$dataset" --model "$1" --layer "$2" --elements "$elements" --element_seed "$element_seed" \
    --concept_types "$concept_types" "${given[@]}")
  while IFS='=' read -r k v; do printf -v "L_$k" '%s' "$v"; done <<< "$lay"
}

# Dataset features first, one pass per split for every model/layer at once (each image decoded once, each backbone run
# once per batch with all its layers); the per-model pipelines below find them up to date.
flag() { local i; for ((i = 0; i < ${#pass[@]}; i += 2)); do
  [ "${pass[i]}" = "--$1" ] && { printf '%s' "${pass[i+1]}"; return 0; }; done; return 0; }
bbname=$(flag backbone)
ask_layout "${bbname:-${models%% *}}" ""
extract=(--dataset "$dataset" --out "$L_features_template/{split}")
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
  ask_layout "${bbname:-$config}" "$layer"
  for ct in $concept_types; do v="L_run_$ct"; runs+=("${!v}"); done
done
report=${report:-$L_reports/compare_$(printf '%s\n' "${runs[@]}" | sha256sum | cut -c1-8)}  # keyed by its runs
"$PY" iis_computing.py "${runs[@]}" --report "$report" --plot "$report/curves.png"
