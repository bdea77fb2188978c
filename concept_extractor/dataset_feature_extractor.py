"""Extract the backbone's pooled features at one layer for a dataset split (a seeded subset if asked).

    python -m concept_extractor.dataset_feature_extractor --model_config efficientnet_lite0 \
        --dataset fashion_mnist --split train --max_images 2000 \
        --out outputs/features/fashion_mnist/efficientnet_lite0/train

Output: a store entry (utils/store.py) with features (N, D) float32, labels (N,) int64 and indices (N,) int64 (rows of
the split), keyed by backbone, weights, layer, pooling, preprocessing, dataset, split and subset.
"""
import argparse
import os
from dataclasses import asdict

import numpy as np

from utils import cli
from utils.backbones import Backbone, extract_to_store
from utils.data import TransformedImages, get_source, subset_indices, subset_key


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_backbone_args(p)
    cli.add_dataset_args(p)
    p.add_argument("--split", default="train", choices=["train", "val"], help="which split")
    p.add_argument("--max_images", type=int, default=None, help="a seeded random subset of this many images")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")
    p.add_argument("--out", required=True, help="store entry folder to write")
    cli.add_loader_args(p)
    return p


def main(args):
    bb = Backbone.from_args(args)  # names are checked before any data is touched
    source = get_source(args.dataset, args.split, args.data_root)
    idx = subset_indices(len(source), args.max_images, args.seed)
    data_key = subset_key(source, idx)
    data = TransformedImages(source, idx, bb.preprocess.image_transform())
    info = {"classes": source.classes, "dataset": source.name, "split": args.split,
            "data_root": os.path.abspath(args.data_root), "backbone": asdict(bb.spec)}
    extract_to_store(bb.extractor, bb.key(), data, data_key, args.out, info, args, desc=f"{args.split} features",
                     extra_arrays={"indices": np.asarray(idx, np.int64)})


if __name__ == "__main__":
    cli.run(main, get_args_parser())
