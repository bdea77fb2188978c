#!/usr/bin/env bash
# Train the standard probe and sparse heads for each concept type on extracted features, then score them side by side.
#
# Without arguments, or with only the original script's variables as flags, it does what the original code's
# ip_train.sh did (paths from the repository root): Prototype heads on the features scripts/emb_extractor.sh wrote to
# concept_extractor/embs/<model_name>/ into IP_training/IP_Prototype/<model_name>/, text heads into IP_training/output/
# when CLIP features are there, then the IIS of both.
#   bash scripts/ip_train.sh
#   bash scripts/ip_train.sh --model_name resnet18 --target_dataset cub --n_epoch 10
# Its flags (defaults in brackets): --model_name [resnet50] --target_dataset [imagenet] --target_layer_name [layer4]
#   --num_concepts [200] --n_epoch [30] --device [auto] --text_concept_path [concept_library/textual/<D>_filtered.txt]
#   --clip_cutoff / --interpretability_cutoff [IP_Text_training's]
#   --protocol [iis]  reference: the original code's keep rule, lr schedule, batch, lr and val selection
#
# With this project's flags:
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
#   --lrs "A B"           [the protocol's: 0.001 0.01, or 0.01 under reference]
#   --seeds "0 1 2"       [0]  seeds stacked as extra heads of one sweep (their spread is reported with the IIS)
#   --protocol P          [iis]  iis (ours) or reference (the original code's keep rule, schedule, batch and lr)
#   --select_on S         [the protocol's]  val or holdout: what picks each head's epoch and each ratio's lr
#   --device D            [auto]
#   --out DIR             runs go to DIR/<concept_type>_<elements>/ (text: DIR/text/), the side-by-side plot to
#                         DIR/iis_<elements>.png
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
features=""; elements=segments; concept_types=prototype; n_concepts=200; epochs=30; lrs=""; device=auto; out=""
seeds=0; protocol=iis; select_on=""
clip=""; clip_cutoff=""; interpretability_cutoff=""
ORIGINAL=" model_name target_dataset target_layer_name num_concepts n_epoch text_concept_path "
original=$(( $# == 0 ))
for a in "$@"; do [[ "$ORIGINAL" == *" ${a#--} "* ]] && original=1; done
if [ "$original" = 1 ]; then   # the original's step
  model_name=resnet50; target_dataset=imagenet; target_layer_name=layer4; num_concepts=200; n_epoch=30
  text_concept_path=""
  parse_flags model_name target_dataset target_layer_name num_concepts n_epoch device text_concept_path clip_cutoff \
    interpretability_cutoff protocol -- "$@"
  embs=concept_extractor/embs/$model_name; tag=$(basename "$target_dataset")
  text_concept_path=${text_concept_path:-concept_library/textual/${tag}_filtered.txt}
  echo "-- prototype concepts"
  "$PY" IP_training/IP_Prototype_training.py --model_name "$model_name" \
    --concept_path "$embs/visual_element_emb.pkl" --num_concepts "$num_concepts" --n_epoch "$n_epoch" \
    --train_pt "$embs/${tag}_train_${model_name}_${target_layer_name}.pt" \
    --val_pt "$embs/${tag}_val_${model_name}_${target_layer_name}.pt" --device "$device" --protocol "$protocol" \
    --save_dir "IP_training/IP_Prototype/$model_name"
  runs=("IP_training/IP_Prototype/$model_name")
  clip="$embs/${tag}_clip_$(basename "${text_concept_path%.*}")"
  if [ -f "$clip/text/meta.json" ]; then
    echo "-- text concepts"
    cut=()
    [ -n "$clip_cutoff" ] && cut+=(--clip_cutoff "$clip_cutoff")
    [ -n "$interpretability_cutoff" ] && cut+=(--interpretability_cutoff "$interpretability_cutoff")
    "$PY" IP_training/IP_Text_training.py --dataset "$target_dataset" --backbone "$model_name" \
      --concept_set "$text_concept_path" --feature_layer "$target_layer_name" --sparsity_ratio --save_dir IP_training/output \
      --activation_dir "$embs" --epochs "$n_epoch" --device "$device" --protocol "$protocol" "${cut[@]}"
    runs+=(IP_training/output)
  else
    echo "-- text concepts skipped: no CLIP features at $clip (emb_extractor.sh's text step needs CLIP weights)"
  fi
  "$PY" iis_computing.py "${runs[@]}"
  exit 0
fi
parse_flags features elements concept_types n_concepts epochs lrs device out clip clip_cutoff interpretability_cutoff \
  seeds protocol select_on -- "$@"
[ -n "$features" ] && [ -n "$out" ] || { echo "error: --features and --out are required (see --help)" >&2; exit 2; }

# shellcheck disable=SC2206  # lrs and seeds are space-separated lists on purpose
training=(--epochs "$epochs" --seeds $seeds --protocol "$protocol" --device "$device")
[ -n "$lrs" ] && training+=(--lrs $lrs)
[ -n "$select_on" ] && training+=(--select_on "$select_on")
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
      --clip "$clip" "${cut[@]}" "${training[@]}" --out "$out/text"
    runs+=("$out/text")
    continue
  fi
  "$PY" -m IP_training.IP_Prototype_training --train_features "$features/train" --val_features "$features/val" \
    --concepts "$features/elements_$elements" --concept_type "$ct" --n_concepts "$n_concepts" "${training[@]}" \
    --out "$out/${ct}_$elements"
  runs+=("$out/${ct}_$elements")
done
"$PY" iis_computing.py "${runs[@]}" --plot "$out/iis_$elements.png"
