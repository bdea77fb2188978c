#!/usr/bin/env bash
# The whole pipeline for one backbone on one dataset, stage by stage; a stage whose output is current is skipped.
#
#   bash scripts/run_pipeline.sh --model_config efficientnet_lite0 --dataset fashion_mnist \
#        --train_size 2000 --val_size 1000 --images_per_class 4 --concept_types "prototype cluster"
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
#   --element_workers N        [1]  processes cutting elements
#   --library DIR              [concept_library/prototype]  root of the element libraries: each dataset, images per
#                              class and seed gets its own, DIR/<data>/ipc<N>_seed<S>/<elements>
#   --element_seed N           [0]  seed of the images elements are cut from; another seed builds its own library,
#                              embeddings and runs, so the IIS spread over element choices can be seen beside the
#                              default
#   --concept_types "..."      [prototype]  any of prototype cluster end2end text
#   --text_concepts FILE       [concept_library/textual/<dataset>.json]  for text: the concept list
#   --clip_model NAME          [ViT-B-16]  for text: open_clip model (or a model-config JSON)
#   --clip_pretrained TAG|FILE [openai]  for text: open_clip pretrained tag or a local checkpoint
#   --clip_cutoff X / --interpretability_cutoff X   for text: override the defaults
#   --n_concepts N             [200]
#   --epochs N                 [30]
#   --lrs "A B"                [the protocol's]
#   --seeds "0 1 2"            [0]  seeds stacked as extra heads of one sweep (spread reported with the IIS)
#   --protocol iis|reference   [iis]  reference = the original code's keep rule, lr schedule, batch and lr
#   --select_on val|holdout    [the protocol's]  what picks each head's epoch and each ratio's lr
#   --floor_draws N            [the protocol's: 3, or 0 under reference]  random-concept floor draws (docs/validity.md)
#   --exclude_background 0|1   [0]  1: leave mostly-background elements out of the visual concept sets
#   --out DIR                  [outputs]  features go to DIR/features/<data>/<model>/<subset>/, runs to
#                              DIR/runs/<data>/<subset>/<model>/<type>_<elements>_ipc<N>_seed<S>[_t<hash>]
#                              (the naming rule: utils/layout.py, docs/files.md; python scripts/layout.py prints them)
#   --workers N --batch_size N --device D   passed to the feature extractors / trainer
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh
export IIS_COMPAT=off   # our flags only: the original code's dialect (utils/compat.py) is for its commands

model_config=efficientnet_lite0; backbone=""; weights=""; layer=""; dataset=fashion_mnist; data_root=data
train_size=0; val_size=0; images_per_class=10; elements=segments; element_workers=1; element_seed=0
library=concept_library/prototype; concept_types=prototype; n_concepts=200; epochs=30; lrs=""
seeds=0; protocol=iis; select_on=""; floor_draws=""; exclude_background=0
out=outputs; workers=""; batch_size=""; device=auto
text_concepts=""; clip_model=ViT-B-16; clip_pretrained=openai; clip_cutoff=""; interpretability_cutoff=""
parse_flags model_config backbone weights layer dataset data_root train_size val_size images_per_class elements \
  element_workers element_seed library concept_types n_concepts epochs lrs out workers batch_size device text_concepts clip_model \
  clip_pretrained clip_cutoff interpretability_cutoff seeds protocol select_on floor_draws exclude_background -- "$@"
case "$elements" in segments|patches) ;; *) echo "error: --elements must be segments or patches" >&2; exit 2 ;; esac

bb=(--model_config "$model_config")
[ -n "$backbone" ] && bb+=(--backbone "$backbone")
[ -n "$weights" ] && bb+=(--weights "$weights")
[ -n "$layer" ] && bb+=(--layer "$layer")
data=(--dataset "$dataset" --data_root "$data_root")
loader=(--device "$device")
[ -n "$workers" ] && loader+=(--workers "$workers")
[ -n "$batch_size" ] && loader+=(--batch_size "$batch_size")

# every folder from the one naming rule (utils/layout.py): dataset, subset sizes, backbone (+ weights), element set
lay=$("$PY" scripts/layout.py --out "$out" \
  --library "$library" --dataset "$dataset" --model "${backbone:-$model_config}" --layer "$layer" --weights "$weights" \
  --train_size "$train_size" --val_size "$val_size" --elements "$elements" --images_per_class "$images_per_class" \
  --element_seed "$element_seed" --clip_model "$clip_model" --clip_pretrained "$clip_pretrained")
while IFS='=' read -r k v; do printf -v "L_$k" '%s' "$v"; done <<< "$lay"
feat=$L_features
extractor=segment_extractor; [ "$elements" = patches ] && extractor=patch_extractor
visual=""; text=""
for ct in $concept_types; do
  case "$ct" in prototype|cluster|end2end) visual+="$ct " ;; text) text=1 ;;
    *) echo "error: unknown concept type $ct" >&2; exit 2 ;; esac
done

if [ -n "$visual" ]; then
  echo "== visual elements ($elements)"
  "$PY" -m "concept_extractor.$extractor" "${data[@]}" --images_per_class "$images_per_class" \
    --out_dir "$L_library_dir" --seed "$element_seed" --workers "$element_workers"
  echo "== element embeddings"
  "$PY" -m concept_extractor.visual_element_emb_extractor "${bb[@]}" "${loader[@]}" \
    --elements "$L_library_dir/$elements" --out "$L_elements_features"
fi
clip_dir=$L_clip
if [ -n "$text" ]; then
  echo "== CLIP text and image features"
  "$PY" -m concept_extractor.textual_emb_extractor "${data[@]}" "${loader[@]}" \
    --concepts "${text_concepts:-concept_library/textual/$(basename "$dataset").json}" --clip_model "$clip_model" \
    --clip_pretrained "$clip_pretrained" --max_train "$train_size" --max_val "$val_size" --out "$clip_dir"
fi
echo "== dataset features"
"$PY" -m concept_extractor.dataset_feature_extractor "${bb[@]}" "${data[@]}" "${loader[@]}" \
  --split train --max_images "$train_size" --out "$feat/train"
"$PY" -m concept_extractor.dataset_feature_extractor "${bb[@]}" "${data[@]}" "${loader[@]}" \
  --split val --max_images "$val_size" --out "$feat/val"
echo "== standard probe + sparse concept heads, IIS"
bash scripts/train_heads.sh --features "$feat" --elements "$L_lib_tag" --concept_types "$concept_types" \
  --n_concepts "$n_concepts" --epochs "$epochs" --lrs "$lrs" --device "$device" \
  --seeds "$seeds" --protocol "$protocol" --select_on "$select_on" --floor_draws "$floor_draws" \
  --exclude_background "$exclude_background" --out "$L_runs" \
  --clip "$clip_dir" --clip_cutoff "$clip_cutoff" --interpretability_cutoff "$interpretability_cutoff"
