#!/usr/bin/env bash
# Stages 4 and 5 on extracted features: the standard probe and sparse heads for each concept type, then their IIS side
# by side (scripts/run_pipeline.sh runs it after stages 1-3).
#
#   bash scripts/train_heads.sh --features outputs/features/fashion_mnist/efficientnet_lite0/n2000-1000 \
#        --elements segments_ipc4_seed0 --concept_types "prototype cluster end2end" \
#        --out outputs/runs/fashion_mnist/n2000-1000/efficientnet_lite0
#
# Flags (defaults in brackets):
#   --features DIR        folder holding the store entries train/, val/ and elements_<elements>/
#   --elements NAME       [segments]  the element set's name: its embeddings are DIR/elements_NAME (run_pipeline.sh
#                         passes segments_ipc<N>_seed<S>)
#   --concept_types "..." [prototype]  any of prototype cluster end2end text
#   --clip DIR            for text: the folder made by concept_extractor.textual_emb_extractor
#   --clip_cutoff X / --interpretability_cutoff X   for text: override IP_Text_training's defaults
#   --n_concepts N        [200]
#   --epochs N            [30]
#   --lrs "A B"           [the protocol's: 0.001 0.01, or 0.01 under reference]
#   --seeds "0 1 2"       [0]  seeds stacked as extra heads of one sweep (their spread is reported with the IIS)
#   --protocol P          [iis]  iis (ours) or reference (the original code's keep rule, schedule, batch and lr)
#   --select_on S         [the protocol's]  val or holdout: what picks each head's epoch and each ratio's lr
#   --floor_draws N       [the protocol's: 3, or 0 under reference]  draws of K random directions trained beside
#                         prototype/cluster/end2end concepts: the floor and concept lift iis_computing.py prints
#                         (docs/validity.md)
#   --exclude_background 0|1  [0]  1: leave mostly-background elements out of the visual concept sets
#   --device D            [auto]
#   --out DIR             runs go to DIR/<concept_type>_<elements>[_t<hash>]/ (text: DIR/text[_t<hash>]/; the
#                         hash names the training settings that differ from these defaults: utils/layout.py), the
#                         side-by-side plot to DIR/iis_<elements>_<type+type...>[_t<hash>].png
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
export IIS_COMPAT=off   # our flags only: the original code's dialect (utils/compat.py) is for its commands
features=""; elements=segments; concept_types=prototype; n_concepts=200; epochs=30; lrs=""; device=auto; out=""
seeds=0; protocol=iis; select_on=""; floor_draws=""; exclude_background=0
clip=""; clip_cutoff=""; interpretability_cutoff=""
parse_flags features elements concept_types n_concepts epochs lrs device out clip clip_cutoff interpretability_cutoff \
  seeds protocol select_on floor_draws exclude_background -- "$@"
[ -n "$features" ] && [ -n "$out" ] || { echo "error: --features and --out are required (see --help)" >&2; exit 2; }

# shellcheck disable=SC2206  # lrs and seeds are space-separated lists on purpose
training=(--epochs "$epochs" --seeds $seeds --protocol "$protocol" --device "$device")
[ -n "$lrs" ] && training+=(--lrs $lrs)
[ -n "$select_on" ] && training+=(--select_on "$select_on")
case "$exclude_background" in 0) nobg=() ;; 1) nobg=(--exclude_background) ;;
  *) echo "error: --exclude_background takes 0 or 1" >&2; exit 2 ;; esac
# run folder names from the one naming rule (utils/layout.py): <type>_<elements>, then _t<hash> of any non-default
# training setting, so another sweep never overwrites this one
declare -A name
lay=$("$PY" scripts/layout.py --lib_tag "$elements" \
  --concept_types "$concept_types" --n_concepts "$n_concepts" --epochs "$epochs" --lrs "$lrs" --seeds "$seeds" \
  --protocol "$protocol" --select_on "$select_on" --clip_cutoff "$clip_cutoff" \
  --interpretability_cutoff "$interpretability_cutoff" --exclude_background "$exclude_background" \
  --floor_draws "$floor_draws")
while IFS='=' read -r k v; do name[$k]=$v; done <<< "$lay"
runs=()
for ct in $concept_types; do
  case "$ct" in prototype|cluster|end2end|text) ;; *) echo "error: unknown concept type $ct" >&2; exit 2 ;; esac
  echo "-- $ct concepts"
  if [ "$ct" = text ]; then
    [ -n "$clip" ] || { echo "error: text concepts need --clip DIR (from textual_emb_extractor)" >&2; exit 2; }
    cut=()
    [ -n "$clip_cutoff" ] && cut+=(--clip_cutoff "$clip_cutoff")
    [ -n "$interpretability_cutoff" ] && cut+=(--interpretability_cutoff "$interpretability_cutoff")
    "$PY" -m IP_training.IP_Text_training --train_features "$features/train" --val_features "$features/val" \
      --clip "$clip" "${cut[@]}" "${training[@]}" --out "$out/${name[text]}"
    runs+=("$out/${name[text]}")
    continue
  fi
  floor=()
  [ -n "$floor_draws" ] && floor+=(--floor_draws "$floor_draws")
  "$PY" -m IP_training.IP_Prototype_training --train_features "$features/train" --val_features "$features/val" \
    --concepts "$features/elements_$elements" --concept_type "$ct" --n_concepts "$n_concepts" "${training[@]}" \
    "${floor[@]}" "${nobg[@]}" \
    --out "$out/${name[$ct]}"
  runs+=("$out/${name[$ct]}")
done
"$PY" iis_computing.py "${runs[@]}" --plot "$out/${name[plot]}"
