#!/usr/bin/env bash
# The original code's runner for stage 1, visual elements. Without arguments it does what its concept_extract.sh did
# (paths from the repository root): SLIC segments of the images in datasets/imagenet/val, a folder of class folders,
# into concept_library/prototype/segments/.
#
#   bash scripts/concept_extract.sh
#   bash scripts/concept_extract.sh --data_root datasets/cub/val --image_per_class 5
#   bash scripts/concept_extract.sh --patches --data_root datasets/cub/val      (grid patches instead)
#
# Arguments go to concept_extractor/segment_extractor.py (patch_extractor.py with --patches), which takes its own
# flags and the original's (its --help); --data_root and --save_root default to the paths above.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_flags.sh

method=segments; source_given=""; out_given=""; pass=()
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    --patches) method=patches; continue ;;
    --data_root|--data_root=*|--dataset|--dataset=*|--images|--images=*) source_given=1 ;;
    --save_root|--save_root=*|--out_dir|--out_dir=*) out_given=1 ;;
  esac
  pass+=("$a")
done
if [ -z "$source_given" ]; then   # the original's default; never another dataset in its place
  [ -d datasets/imagenet/val ] || { echo "error: no datasets/imagenet/val (a folder of class folders of images, the" \
    "original's default): give one with --data_root DIR, or a named dataset with --dataset fashion_mnist" >&2; exit 2; }
  pass+=(--data_root datasets/imagenet/val)
fi
[ -n "$out_given" ] || pass+=(--save_root "concept_library/prototype/$method")
script=segment_extractor; [ "$method" = patches ] && script=patch_extractor
"$PY" "concept_extractor/$script.py" "${pass[@]}"
