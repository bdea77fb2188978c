#!/usr/bin/env bash
# The Prototype pipeline for one backbone on one dataset, stage by stage; a stage whose output is current is skipped.
#
#   bash scripts/run_pipeline.sh --model_config efficientnet_lite0 --dataset fashion_mnist \
#        --train_size 2000 --val_size 1000 --images_per_class 4
#
# Flags (defaults in brackets):
#   --model_config NAME|PATH   [efficientnet_lite0]  a model_configs/ YAML
#   --backbone NAME            []   override: torchvision name or timm:<name> (with --weights)
#   --weights W                []   override weights (see --help of any extractor)
#   --layer NAME               []   override the feature layer
#   --dataset NAME|PATH        [fashion_mnist]  fashion_mnist, cifar10, cifar100 or an ImageFolder root
#   --data_root DIR            [data]
#   --train_size N / --val_size N   [all]  seeded subsets of the splits
#   --images_per_class N       [10]  images per class to cut visual elements from
#   --elements segments|patches [segments]
#   --library DIR              [concept_library/prototype]  where element images go
#   --n_concepts N             [200]
#   --epochs N                 [30]
#   --lrs "A B"                [0.001 0.01]
#   --out DIR                  [outputs]  features go to DIR/features/..., results to DIR/runs/...
#   --workers N --batch_size N --device D   passed to the extractors / trainer
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}

model_config=efficientnet_lite0; backbone=""; weights=""; layer=""; dataset=fashion_mnist; data_root=data
train_size=0; val_size=0; images_per_class=10; elements=segments; n_concepts=200; epochs=30; lrs="0.001 0.01"
library=concept_library/prototype; out=outputs; workers=""; batch_size=""; device=auto
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --model_config|--backbone|--weights|--layer|--dataset|--data_root|--train_size|--val_size|--images_per_class|\
    --elements|--library|--n_concepts|--epochs|--lrs|--out|--workers|--batch_size|--device)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      printf -v "${1#--}" '%s' "$2"; shift 2 ;;
    *) echo "error: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$elements" in segments|patches) ;; *) echo "error: --elements must be segments or patches" >&2; exit 2 ;; esac

bb=(--model_config "$model_config")
[ -n "$backbone" ] && bb+=(--backbone "$backbone")
[ -n "$weights" ] && bb+=(--weights "$weights")
[ -n "$layer" ] && bb+=(--layer "$layer")
data=(--dataset "$dataset" --data_root "$data_root")
loader=(--device "$device")
[ -n "$workers" ] && loader+=(--workers "$workers")
[ -n "$batch_size" ] && loader+=(--batch_size "$batch_size")

tag_model=$(basename "${backbone:-$model_config}" .yaml | tr ':/' '__')${layer:+@$layer}
tag_data=$(basename "$dataset")
feat="$out/features/$tag_data/$tag_model"
run="$out/runs/$tag_data/$tag_model/prototype_$elements"
extractor=segment_extractor; [ "$elements" = patches ] && extractor=patch_extractor

echo "== 1/5 visual elements ($elements)"
"$PY" -m "concept_extractor.$extractor" "${data[@]}" --images_per_class "$images_per_class" --out_dir "$library"
echo "== 2/5 element embeddings"
"$PY" -m concept_extractor.visual_element_emb_extractor "${bb[@]}" "${loader[@]}" \
  --elements "$library/$elements" --out "$feat/elements_$elements"
echo "== 3/5 dataset features"
"$PY" -m concept_extractor.dataset_feature_extractor "${bb[@]}" "${data[@]}" "${loader[@]}" \
  --split train --max_images "$train_size" --out "$feat/train"
"$PY" -m concept_extractor.dataset_feature_extractor "${bb[@]}" "${data[@]}" "${loader[@]}" \
  --split val --max_images "$val_size" --out "$feat/val"
echo "== 4/5 standard probe + sparse Prototype heads"
# shellcheck disable=SC2086  # lrs is a space-separated list on purpose
"$PY" -m IP_training.IP_Prototype_training --train_features "$feat/train" --val_features "$feat/val" \
  --concepts "$feat/elements_$elements" --n_concepts "$n_concepts" --epochs "$epochs" --lrs $lrs \
  --device "$device" --out "$run"
echo "== 5/5 IIS"
"$PY" iis_computing.py "$run"
