#!/usr/bin/env bash
# The original code's runner for stage 4 and the score: without arguments it does what its ip_train.sh did (paths
# from the repository root): Prototype heads on the features scripts/emb_extractor.sh wrote to
# concept_extractor/embs/<model_name>/ into IP_training/IP_Prototype/<model_name>/, text heads into IP_training/output/
# when CLIP features are there, then the IIS of both. (This project's own stage-4/5 runner is scripts/train_heads.sh.)
#
#   bash scripts/ip_train.sh
#   bash scripts/ip_train.sh --model_name resnet18 --target_dataset cub --n_epoch 10
#
# Flags (the original script's variables; defaults in brackets):
#   --model_name [resnet50] --target_dataset [imagenet] --target_layer_name [layer4] --num_concepts [200]
#   --n_epoch [30] --device [auto] --text_concept_path [concept_library/textual/<D>_filtered.txt]
#   --clip_cutoff / --interpretability_cutoff [IP_Text_training's]
#   --protocol [iis]  reference: the original code's keep rule, lr schedule, batch, lr and val selection
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
model_name=resnet50; target_dataset=imagenet; target_layer_name=layer4; num_concepts=200; n_epoch=30
text_concept_path=""; device=auto; protocol=iis; clip_cutoff=""; interpretability_cutoff=""
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
