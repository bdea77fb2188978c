r"""CLIP features for text concepts: the concepts' text embeddings and the train/val images' CLIP image embeddings
(the targets the text path's projection learns to reproduce from the backbone).

    python -m concept_extractor.textual_emb_extractor --concepts concept_library/textual/fashion_mnist.json \
        --dataset fashion_mnist --max_train 2000 --max_val 1000 \
        --clip_model ViT-B-16 --clip_pretrained openai --out outputs/features/fashion_mnist/clip

--clip_pretrained takes an open_clip tag (openai, laion2b_s34b_b88k, ...), a local checkpoint file, or 'none' (random
weights: plumbing only). --clip_model may also be an open_clip model-config JSON. Use the same --max_train/--max_val/
--seed as the backbone's dataset_feature_extractor run, so rows line up (IP_Text_training checks).

The original code's textual_emb_extractor also extracted the backbone's train/val features; its command works here
from inside concept_extractor/ (utils/compat.py runs dataset_feature_extractor for those, with the same subsets,
first):

    python textual_emb_extractor.py --dataset imagenet --concept_set ../concept_library/textual/imagenet_filtered.txt \
        --backbone resnet50 --activation_dir ./embs/resnet50/ --feature_layer layer4

writes embs/resnet50/imagenet_{train,val}_resnet50_layer4 (the entries its IP_Prototype_training --train_pt/--val_pt
name) and then the CLIP features to embs/resnet50/imagenet_clip_imagenet_filtered.

Output in --out: store entries text/ (features (C, d) unit-norm; info.concepts = the C concept strings), train/ and
val/ (features (N, d) unit-norm CLIP image embeddings, labels, indices).
"""
import argparse
import hashlib
import os

import numpy as np

from utils import cli, compat, store
from utils.cli import flags
from utils.data import get_source, subset_indices, subset_key
from utils.device import resolve_device
from utils.extraction import ExtractConfig, extract_to_store
from utils.feeds import GroupedImages
from utils.text import CLIP, read_concepts
from utils.validate import RebuildConfig


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", required=True, help="concept file: .txt (one per line) or .json (list, or class -> "
                                                     "concepts as LaBo writes them)")
    p.add_argument("--clip_model", default="ViT-B-16", help="open_clip model name, or a model-config JSON path")
    p.add_argument("--clip_pretrained", default="openai", help="open_clip pretrained tag, a checkpoint file, or none")
    flags.add_dataset_args(p)
    p.add_argument("--max_train", type=int, default=None, help="seeded subset of the train split (as for the backbone)")
    p.add_argument("--max_val", type=int, default=None, help="seeded subset of the val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    p.add_argument("--out", required=True, help="folder for the text/, train/ and val/ store entries")
    flags.add_strict_arg(flags.add_loader_args(p))
    flags.add_rebuild_args(p, reads="the images' bytes")
    return p


def main(args):
    device = resolve_device(args.device)
    concepts = read_concepts(args.concepts)
    clip = CLIP(args.clip_model, args.clip_pretrained, str(device))
    text_key = {"schema": 1, "clip": clip.key, "concepts": hashlib.sha256("\n".join(concepts).encode()).hexdigest()}
    text_out = os.path.join(args.out, "text")
    rebuild, command = cli.config(RebuildConfig, args), cli.command()
    if not rebuild.force and store.is_current(text_out, text_key):     # the key holds the concepts' text itself
        print(f"{text_out} is up to date")
    else:
        feats = clip.encode_text(concepts)
        store.write(text_out, {"features": feats}, text_key, {"concepts": concepts, "source": args.concepts,
                                                              "command": command})
        print(f"{len(concepts)} concepts x {feats.shape[1]} -> {text_out}")
    for split, n in (("train", args.max_train), ("val", args.max_val)):
        source = get_source(args.dataset, split, args.data_root)
        idx = subset_indices(len(source), n, args.seed)
        data_key = subset_key(source, idx)
        extract_to_store(clip.image_encoder, clip.key, GroupedImages(source, idx, [clip.preprocess]), data_key,
                         os.path.join(args.out, split), {"classes": source.classes, "dataset": source.name,
                                                         "split": split, "command": command},
                         cli.config(ExtractConfig, args), desc=f"CLIP {split} images",
                         extra_arrays={"indices": np.asarray(idx, np.int64)}, content=source.content_digest,
                         rebuild=rebuild, strict=args.strict)


if __name__ == "__main__":
    cli.run(main, get_args_parser(), dialect=compat.dialect(__file__))
