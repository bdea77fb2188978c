#!/usr/bin/env bash
# A classifiability series: one dataset, subset and element library, scored at points whose classifiability differs
# by construction (the layers of one backbone, its checkpoints along a fine-tuning run, or several backbones), each
# point by the whole pipeline (scripts/run_pipeline.sh: IIS with its interval, standard top-1, floor and lift), then
# one report per concept type: the table, IIS against standard top-1 and their correlation with intervals.
#
#   bash scripts/classifiability_series.sh --series layers --model_config efficientnet_lite0 \
#        --values "blocks.2 blocks.3 blocks.4 blocks.5 blocks.6 pre_logits" \
#        --dataset fashion_mnist --train_size 2000 --val_size 1000 --images_per_class 4
#
# Series (--series) and their points (--values, in order):
#   layers       layers of --model_config; each point's dataset features and element embeddings are read at that
#                layer (pooled as the config says) [blocks.2 blocks.3 blocks.4 blocks.5 blocks.6 pre_logits]
#   checkpoints  weights files of --model_config, e.g. the per-epoch checkpoints IP_finetune --save_epochs writes
#                (no default: name them)
#   models       model_configs/ names, each optionally with :LAYER as in compare_backbones.sh
#                [efficientnet_lite0 efficientnet_lite1 efficientnet_lite2]
#
# Flags (defaults in brackets):
#   --series layers|checkpoints|models   [layers]
#   --values "..."             [per series, above]
#   --model_config NAME|PATH   [efficientnet_lite0]  the backbone of a layers or checkpoints series
#   --dataset NAME|PATH        [fashion_mnist]
#   --data_root DIR            [data]
#   --train_size N / --val_size N   [all]  seeded subsets of the splits
#   --images_per_class N       [10]
#   --elements segments|patches [segments]
#   --element_seed N           [0]
#   --element_workers N        [1]
#   --library DIR              [concept_library/prototype]
#   --concept_types "..."      [prototype]  any of prototype cluster end2end: one report each
#   --n_concepts N             [200]
#   --epochs N                 [30]
#   --lrs "A B"                [the protocol's]
#   --seeds "0 1 2"            [0]
#   --floor_draws N            [the protocol's: 3]  random-concept floor draws (the lift column)
#   --out DIR                  [outputs]  features and runs where scripts/run_pipeline.sh puts them (utils/layout.py):
#                              a point equal to another experiment's run reuses it
#   --report DIR               [<out>/reports/<data>/<subset>/series_<series>_<hash of its run folders>]  the
#                              report of each concept type goes to DIR/<type>/
#   --workers N --batch_size N --device D   passed to the feature extractors / trainer
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
export IIS_COMPAT=off   # our flags only: the original code's dialect (utils/compat.py) is for its commands

series=layers; values=""; model_config=efficientnet_lite0; dataset=fashion_mnist; data_root=data
train_size=0; val_size=0; images_per_class=10; elements=segments; element_seed=0; element_workers=1
library=concept_library/prototype; concept_types=prototype; n_concepts=200; epochs=30; lrs=""; seeds=0
floor_draws=""; out=outputs; report=""; workers=""; batch_size=""; device=auto
parse_flags series values model_config dataset data_root train_size val_size images_per_class elements element_seed \
  element_workers library concept_types n_concepts epochs lrs seeds floor_draws out report workers batch_size \
  device -- "$@"
case "$series" in
  layers) values=${values:-blocks.2 blocks.3 blocks.4 blocks.5 blocks.6 pre_logits} ;;
  models) values=${values:-efficientnet_lite0 efficientnet_lite1 efficientnet_lite2} ;;
  checkpoints) [ -n "$values" ] || { echo "error: --series checkpoints needs --values \"FILE FILE ...\"" >&2; exit 2; }
    for v in $values; do
      [ -f "$v" ] || { echo "error: checkpoint $v does not exist; give the weights files of the series" >&2; exit 2; }
    done ;;
  *) echo "error: --series must be layers, checkpoints or models, got '$series'" >&2; exit 2 ;;
esac
for ct in $concept_types; do
  case "$ct" in prototype|cluster|end2end) ;;
    *) echo "error: --concept_types: $ct is not a visual concept type (prototype cluster end2end)" >&2; exit 2 ;;
  esac
done
read -r -a points <<< "$values"
[ ${#points[@]} -ge 2 ] || { echo "error: --values: a series needs at least 2 points, got '$values'" >&2; exit 2; }

# point I as (model, layer, weights): what run_pipeline.sh is given and what scripts/layout.py names
point() {
  case "$series" in
    layers) P_model=$model_config; P_layer=${points[$1]}; P_weights="" ;;
    checkpoints) P_model=$model_config; P_layer=""; P_weights=${points[$1]} ;;
    models) P_model=${points[$1]%%:*}; P_layer=""; P_weights=""
      if [ "$P_model" != "${points[$1]}" ]; then P_layer=${points[$1]#*:}; fi ;;
  esac
}
training=(--n_concepts "$n_concepts" --epochs "$epochs" --lrs "$lrs" --seeds "$seeds" --floor_draws "$floor_draws")
ask_layout() {  # ask_layout: sets L_<name> for the current point from the one naming rule
  local k v lay
  lay=$("$PY" scripts/layout.py --out "$out" --library "$library" --dataset "$dataset" --model "$P_model" \
    --layer "$P_layer" --weights "$P_weights" --train_size "$train_size" --val_size "$val_size" \
    --elements "$elements" --images_per_class "$images_per_class" --element_seed "$element_seed" \
    --concept_types "$concept_types" "${training[@]}")
  while IFS='=' read -r k v; do printf -v "L_$k" '%s' "$v"; done <<< "$lay"
}
loader=(--device "$device")
[ -n "$workers" ] && loader+=(--workers "$workers")
[ -n "$batch_size" ] && loader+=(--batch_size "$batch_size")

# Layers and models: the dataset features of every point in one pass per split (each image decoded once, the backbone
# run once per batch with all its layers); the per-point pipelines below find them up to date.
if [ "$series" != checkpoints ]; then
  configs=()
  for i in "${!points[@]}"; do point "$i"; configs+=("$P_model${P_layer:+:$P_layer}"); done
  point 0; ask_layout
  for split in train val; do
    n=$train_size; [ "$split" = val ] && n=$val_size
    echo "=== $split features of every point in one pass"
    "$PY" -m concept_extractor.dataset_feature_extractor --model_config "${configs[@]}" --dataset "$dataset" \
      --data_root "$data_root" --split "$split" --max_images "$n" --out "$L_features_template/{split}" "${loader[@]}"
  done
fi

runs=()
for i in "${!points[@]}"; do
  point "$i"
  echo "=== point $((i + 1))/${#points[@]}: $P_model${P_layer:+ at $P_layer}${P_weights:+ with $P_weights}"
  bash scripts/run_pipeline.sh --model_config "$P_model" ${P_layer:+--layer "$P_layer"} \
    ${P_weights:+--weights "$P_weights"} --dataset "$dataset" --data_root "$data_root" --train_size "$train_size" \
    --val_size "$val_size" --images_per_class "$images_per_class" --elements "$elements" \
    --element_seed "$element_seed" --element_workers "$element_workers" --library "$library" \
    --concept_types "$concept_types" "${training[@]}" --out "$out" "${loader[@]}"
  ask_layout
  for ct in $concept_types; do v="L_run_$ct"; runs+=("$ct=${!v}"); done
done
report=${report:-$L_reports/series_${series}_$(printf '%s\n' "${runs[@]}" | sha256sum | cut -c1-8)}  # keyed by its runs
for ct in $concept_types; do
  mine=()
  for r in "${runs[@]}"; do [ "${r%%=*}" = "$ct" ] && mine+=("${r#*=}"); done
  echo "=== $series series, $ct concepts: report"
  "$PY" iis_computing.py "${mine[@]}" --report "$report/$ct"
done
