#!/usr/bin/env bash
# Plain fine-tuning against fine-tuning with interpretability maximisation, for one backbone on one dataset: fine-tunes
# every (seed, lambda) with IP_training.IP_finetune (lambda 0 = plain), scores the pretrained and every fine-tuned
# backbone with the normal pipeline (scripts/run_pipeline.sh --weights <checkpoint>: same element library, same
# subsets) on (a) the training concepts and (b) unseen concepts (--unseen_types from an element library cut from
# images that neither the training library nor the fine-tuning subset holds: scripts/unseen_seed.py picks its seed,
# the runner checks the built libraries share no source image), then writes one comparison report
# (iis_computing.py --report) and a table of mean ± std over seeds with paired interp - plain comparisons per seed.
#
#   bash scripts/finetune_compare.sh --model_config efficientnet_lite0 --dataset fashion_mnist \
#        --train_size 1000 --val_size 500 --images_per_class 2 --seeds "0 1 2" --lambdas "0.5 1" \
#        --train_layers 2 --epochs 3 --lr 3e-4 --head_lr 1e-2 --batch_size 32
#
# Flags (defaults in brackets):
#   --model_config NAME|PATH  [efficientnet_lite0]   --backbone NAME  --weights W (the starting weights)  --layer NAME
#   --dataset NAME|PATH       [fashion_mnist]        --data_root DIR [data]
#   --train_size N / --val_size N   [0 = all]  seeded subsets: fine-tuning and scoring use the same rows
#   --subset_seed N           [0]  seed of the fine-tuning's subsets (another seed fine-tunes on other rows; the
#                             scoring keeps the pipeline's seed-0 subsets, so interp and plain are paired on them)
#   --images_per_class N      [10]  images per class cut into visual elements (one library for every run)
#   --elements segments|patches [segments]   --library DIR [concept_library/prototype]
#   --concept_type prototype|cluster [prototype]  concepts of the interpretability term and of the scoring heads
#   --n_concepts N [200]   --ratio S [0.1]  sparsity of the fine-tuning concept head
#   --unseen_types "..."      [prototype cluster]  concept types scored on the unseen library ("" = none)
#   --floor_draws N           [the protocol's]  random-concept floor draws of every scoring run (0 = none)
#   --seeds "..."             [0 1 2]
#   --lambdas "..."           [0.5 1]  interpretability weights (the plain arm, lambda 0, always runs)
#   --train_layers "..."      [all]  all, N (last N blocks), or module names
#   --refresh step|epoch|frozen [step]   --epochs N [4]   --lr X [1e-4]   --head_lr X [1e-3]
#   --weight_decay X [0.01]   --batch_size N [64]   --cache_views N [0 = one per epoch]
#   --score_epochs N [30]   --score_lrs "A B" [0.001 0.01]   the scoring sweep's epochs and lr grid
#   --workers N [2]   --device D [auto]
#   --out DIR [outputs]  fine-tuning in DIR/finetune/<data>/<subset>/<model>/ft_<hash of these flags>/, scoring in
#                        .../score/<arm>/ (utils/layout.py)
#   --report DIR [DIR/reports/<data>/<subset>/finetune_<model>_ft_<hash>]  report.md/csv, curves, scatter,
#                        finetune_compare.md/csv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
export PYTHON="$PY"      # the runners it calls use the same interpreter
export IIS_COMPAT=off   # our flags only: the original code's dialect (utils/compat.py) is for its commands

model_config=efficientnet_lite0; backbone=""; weights=""; layer=""; dataset=fashion_mnist; data_root=data
train_size=0; val_size=0; images_per_class=10; elements=segments; library=concept_library/prototype
concept_type=prototype; n_concepts=200; ratio=0.1; seeds="0 1 2"; lambdas="0.5 1"; train_layers=all
refresh=step; epochs=4; lr=1e-4; head_lr=1e-3; weight_decay=0.01; batch_size=64; cache_views=0
score_epochs=30; score_lrs="0.001 0.01"; workers=2; device=auto; out=outputs; report=""
subset_seed=0; unseen_types="prototype cluster"; floor_draws=""
parse_flags model_config backbone weights layer dataset data_root train_size val_size images_per_class elements \
  library concept_type n_concepts ratio seeds lambdas train_layers refresh epochs lr head_lr weight_decay batch_size \
  cache_views score_epochs score_lrs workers device out report subset_seed unseen_types floor_draws -- "$@"
case "$concept_type" in prototype|cluster) ;; *) echo "error: --concept_type must be prototype or cluster" >&2; exit 2 ;; esac
case "$elements" in segments|patches) ;; *) echo "error: --elements must be segments or patches" >&2; exit 2 ;; esac
[ -n "$seeds" ] || { echo "error: --seeds is empty" >&2; exit 2; }
for l in $lambdas; do
  "$PY" -c "import sys; v = float(sys.argv[1]); sys.exit(0 if v > 0 else 1)" "$l" 2>/dev/null || \
    { echo "error: --lambdas takes positive numbers (lambda 0, the plain arm, always runs), got '$l'" >&2; exit 2; }
done

bb=(--model_config "$model_config")
[ -n "$backbone" ] && bb+=(--backbone "$backbone")
[ -n "$layer" ] && bb+=(--layer "$layer")
start_weights=(); [ -n "$weights" ] && start_weights=(--weights "$weights")
sizes=(--train_size "$train_size" --val_size "$val_size")
# settings that joined the folder's key later: named only when not their defaults, so older folders keep their names
extra=""
[ "$subset_seed" != 0 ] && extra+=" subset_seed=$subset_seed"
[ "$unseen_types" != "prototype cluster" ] && extra+=" unseen_types=${unseen_types// /,}"
[ -n "$floor_draws" ] && extra+=" floor_draws=$floor_draws"
ask_layout() {  # ask_layout OUT [layout.py flags: --weights FILE, --element_seed N ...]: sets L_<name> (utils/layout.py)
  local k v lay o=$1; shift
  lay=$("$PY" scripts/layout.py --out "$o" \
    --library "$library" --dataset "$dataset" --model "${backbone:-$model_config}" --layer "$layer" \
    "${sizes[@]}" --elements "$elements" --images_per_class "$images_per_class" --concept_types "$concept_type" \
    --n_concepts "$n_concepts" --epochs "$score_epochs" --lrs "$score_lrs" --floor_draws "$floor_draws" "$@" \
    --finetune "weights=$weights \
      concept_type=$concept_type n_concepts=$n_concepts ratio=$ratio seeds=${seeds// /,} lambdas=${lambdas// /,} \
      train_layers=${train_layers// /,} refresh=$refresh epochs=$epochs lr=$lr head_lr=$head_lr \
      weight_decay=$weight_decay batch_size=$batch_size cache_views=$cache_views score_epochs=$score_epochs \
      score_lrs=${score_lrs// /,} elements=$elements images_per_class=$images_per_class$extra")
  while IFS='=' read -r k v; do printf -v "L_$k" '%s' "$v"; done <<< "$lay"
}
ask_layout "$out" "${start_weights[@]}"
base=$L_finetune   # every setting above in its name: another comparison never overwrites this one
library_dir=$L_library_dir
report=${report:-$L_reports/finetune_${L_model_tag}_${base##*/}}
# the unseen library's seed: its images are in neither the training library nor the fine-tuning subset
while IFS='=' read -r k v; do printf -v "U_$k" '%s' "$v"; done <<< "$("$PY" scripts/unseen_seed.py \
  --dataset "$dataset" --data_root "$data_root" --images_per_class "$images_per_class" --train_size "$train_size" \
  --subset_seed "$subset_seed")"
# every scoring run: same dataset, subsets, element libraries, concept types and sweep
score() {  # score TAG [--weights FILE]: appends "<concept set> <run folder>" lines to the array scored
  local tag=$1 set ct v; shift
  local common=("${bb[@]}" "$@" --dataset "$dataset" --data_root "$data_root" "${sizes[@]}"
    --images_per_class "$images_per_class" --elements "$elements" --library "$library" --n_concepts "$n_concepts"
    --epochs "$score_epochs" --lrs "$score_lrs" --floor_draws "$floor_draws" --workers "$workers" --device "$device"
    --out "$base/score/$tag")
  scored=()
  echo "=== scoring $tag (training concepts)"
  bash scripts/run_pipeline.sh "${common[@]}" --concept_types "$concept_type"
  ask_layout "$base/score/$tag" "$@"
  v="L_run_$concept_type"; scored+=("train:$concept_type"$'\t'"${!v}"); runs+=("${!v}")
  [ -n "$unseen_types" ] || return 0
  echo "=== scoring $tag (unseen concepts: elements of seed $U_unseen_seed)"
  bash scripts/run_pipeline.sh "${common[@]}" --concept_types "$unseen_types" --element_seed "$U_unseen_seed"
  ask_layout "$base/score/$tag" "$@" --element_seed "$U_unseen_seed" --concept_types "$unseen_types"
  for ct in $unseen_types; do v="L_run_$ct"; scored+=("unseen:$ct"$'\t'"${!v}"); runs+=("${!v}"); done
  [ -n "${unseen_checked:-}" ] && return 0
  "$PY" scripts/unseen_seed.py --check "$library_dir/$elements" "$L_library_dir/$elements"
  unseen_checked=1
}

mkdir -p "$base"
manifest="$base/manifest.tsv.partial"
: > "$manifest"
runs=()
score pretrained "${start_weights[@]}"        # also cuts the element library every fine-tuning run uses
for r in "${scored[@]}"; do printf 'pretrained\t\t-\t%s\n' "$r" >> "$manifest"; done
for seed in $seeds; do
  for lam in 0 $lambdas; do
    if [ "$lam" = 0 ]; then arm=plain; tag="plain_seed$seed"; else arm=interp; tag="interp${lam}_seed$seed"; fi
    echo "=== fine-tuning $tag"
    # shellcheck disable=SC2086  # train_layers is a list on purpose
    "$PY" -m IP_training.IP_finetune "${bb[@]}" "${start_weights[@]}" --dataset "$dataset" --data_root "$data_root" \
      "${sizes[@]}" --elements "$library_dir/$elements" --concept_type "$concept_type" --n_concepts "$n_concepts" \
      --ratio "$ratio" --lambda_interp "$lam" --train_layers $train_layers --refresh "$refresh" --epochs "$epochs" \
      --lr "$lr" --head_lr "$head_lr" --weight_decay "$weight_decay" --batch_size "$batch_size" --seed "$seed" \
      --cache_views "$cache_views" --cache_dir "$base/cache" --workers "$workers" --device "$device" \
      --subset_seed "$subset_seed" --out "$base/ft/$tag"
    score "$tag" --weights "$base/ft/$tag/backbone.safetensors"
    for r in "${scored[@]}"; do printf '%s\t%s\t%s\t%s\n' "$arm" "$lam" "$seed" "$r" >> "$manifest"; done
  done
done
mv "$manifest" "$base/manifest.tsv"
"$PY" iis_computing.py "${runs[@]}" --report "$report" --plot "$report/curves.png"
"$PY" -m IP_training.IP_finetune_compare "$base/manifest.tsv" --out "$report"
echo "table: $report/finetune_compare.md (and .csv); fine-tuning logs: $base/ft/*/finetune.json"
