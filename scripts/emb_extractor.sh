#!/usr/bin/env bash
# The original code's runner for stage 2: element embeddings and the backbone's train/val features (+ CLIP's, for text
# concepts). Without arguments it does what its emb_extractor.sh did (paths from the repository root): ResNet-50
# (IMAGENET1K_V1) at layer4 on concept_library/prototype/segments and on datasets/imagenet/{train,val}, written where
# scripts/ip_train.sh (no arguments) and the original's IP_training commands look: concept_extractor/embs/resnet50/.
#
#   bash scripts/emb_extractor.sh
#   bash scripts/emb_extractor.sh --model resnet18 --target_dataset cub --text_concept_path my_concepts.txt
#
# Flags (the original script's variables; defaults in brackets):
#   --model NAME               [resnet50]  a model_configs/ name (its weights and layer) or a torchvision model
#   --weights W                [IMAGENET1K_V1]
#   --config_yaml FILE         []  e.g. model_configs/resnet50_IMAGENET1K_V1.yaml (the original's name resolves)
#   --target_layer_name L      [layer4]
#   --target_dataset D         [imagenet]  datasets/<D>/{train,val}, or an ImageFolder path
#   --prototype_concept_path DIR   [concept_library/prototype/segments]
#   --text_concept_path FILE   [concept_library/textual/<D>_filtered.txt]  the text step needs it and CLIP weights
#   --clip_model NAME / --clip_pretrained TAG|FILE   [ViT-B-16 / openai]
#   --device D / --workers N   [auto / 4]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
model=resnet50; weights=IMAGENET1K_V1; config_yaml=""; target_layer_name=layer4; target_dataset=imagenet
prototype_concept_path=concept_library/prototype/segments; text_concept_path=""; clip_model=ViT-B-16
clip_pretrained=openai; device=auto; workers=4
parse_flags model weights config_yaml target_layer_name target_dataset prototype_concept_path text_concept_path \
  clip_model clip_pretrained device workers -- "$@"
tag=$(basename "$target_dataset")
common=(--weights "$weights" --device "$device" --workers "$workers")

echo "== element embeddings"
"$PY" concept_extractor/visual_element_emb_extractor.py ${config_yaml:+--config_yaml "$config_yaml"} \
  --model "$model" --target_layer_name "$target_layer_name" --data-path "$prototype_concept_path" "${common[@]}"
echo "== backbone train/val features, then CLIP text and image features"
"$PY" concept_extractor/textual_emb_extractor.py --dataset "$target_dataset" \
  --concept_set "${text_concept_path:-concept_library/textual/${tag}_filtered.txt}" --backbone "$model" \
  --activation_dir "concept_extractor/embs/$model" --feature_layer "$target_layer_name" \
  --clip_model "$clip_model" --clip_pretrained "$clip_pretrained" "${common[@]}"
