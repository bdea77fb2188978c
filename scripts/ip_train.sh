#!/usr/bin/env bash
# Train the standard probe and sparse heads for each concept type on extracted features, then score them side by side.
#
#   bash scripts/ip_train.sh --features outputs/features/fashion_mnist/efficientnet_lite0 --elements segments \
#        --concept_types "prototype cluster end2end" --out outputs/runs/fashion_mnist/efficientnet_lite0
#
# Flags (defaults in brackets):
#   --features DIR        folder holding the store entries train/, val/ and elements_<elements>/
#   --elements NAME       [segments]  segments or patches
#   --concept_types "..." [prototype]  any of prototype cluster end2end text
#   --clip DIR            for text: the folder made by concept_extractor.textual_emb_extractor
#   --clip_cutoff X / --interpretability_cutoff X   for text: override IP_Text_training's defaults
#   --n_concepts N        [200]
#   --epochs N            [30]
#   --lrs "A B"           [0.001 0.01]
#   --device D            [auto]
#   --out DIR             runs go to DIR/<concept_type>_<elements>/ (text: DIR/text/), the side-by-side plot to
#                         DIR/iis_<elements>.png
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
PY=${PYTHON:-python}
features=""; elements=segments; concept_types=prototype; n_concepts=200; epochs=30; lrs="0.001 0.01"; device=auto; out=""
clip=""; clip_cutoff=""; interpretability_cutoff=""
parse_flags features elements concept_types n_concepts epochs lrs device out clip clip_cutoff interpretability_cutoff \
  -- "$@"
[ -n "$features" ] && [ -n "$out" ] || { echo "error: --features and --out are required (see --help)" >&2; exit 2; }

runs=()
for ct in $concept_types; do
  case "$ct" in prototype|cluster|end2end|text) ;; *) echo "error: unknown concept type $ct" >&2; exit 2 ;; esac
  echo "-- $ct concepts"
  if [ "$ct" = text ]; then
    [ -n "$clip" ] || { echo "error: text concepts need --clip DIR (from textual_emb_extractor)" >&2; exit 2; }
    cut=()
    [ -n "$clip_cutoff" ] && cut+=(--clip_cutoff "$clip_cutoff")
    [ -n "$interpretability_cutoff" ] && cut+=(--interpretability_cutoff "$interpretability_cutoff")
    # shellcheck disable=SC2086
    "$PY" -m IP_training.IP_Text_training --train_features "$features/train" --val_features "$features/val" \
      --clip "$clip" "${cut[@]}" --epochs "$epochs" --lrs $lrs --device "$device" --out "$out/text"
    runs+=("$out/text")
    continue
  fi
  # shellcheck disable=SC2086  # lrs is a space-separated list on purpose
  "$PY" -m IP_training.IP_Prototype_training --train_features "$features/train" --val_features "$features/val" \
    --concepts "$features/elements_$elements" --concept_type "$ct" --n_concepts "$n_concepts" --epochs "$epochs" \
    --lrs $lrs --device "$device" --out "$out/${ct}_$elements"
  runs+=("$out/${ct}_$elements")
done
"$PY" iis_computing.py "${runs[@]}" --plot "$out/iis_$elements.png"
