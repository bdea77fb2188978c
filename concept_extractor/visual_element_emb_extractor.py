r"""Embed every visual element image with a backbone at one layer: the raw material of the visual concepts.

    python -m concept_extractor.visual_element_emb_extractor --model_config efficientnet_lite0 \
        --elements concept_library/prototype/segments \
        --out outputs/features/fashion_mnist/efficientnet_lite0/elements_segments

Output: a store entry (utils/store.py) with features (N, D) float32 and labels (N,) int64, row i = element i of the
library's index.json. Elements are resized to the backbone's input size without cropping.
"""
import argparse
import os
from dataclasses import asdict

from utils import cli, compat
from utils.backbones import Backbone
from utils.cli import flags
from utils.data import ElementImages
from utils.extraction import ExtractConfig, extract_to_store
from utils.fileio import file_digest
from utils.library import elements_digest, read_index
from utils.validate import RebuildConfig


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_backbone_args(p)
    p.add_argument("--elements", default="concept_library/prototype/segments",
                   help="an element library folder (holds index.json) made by segment_extractor or patch_extractor")
    p.add_argument("--out", required=True, help="store entry folder to write")
    flags.add_loader_args(p)
    flags.add_rebuild_args(p, reads="the element images' bytes")
    return p


def main(args):
    index_path, index = read_index(args.elements)
    bb = Backbone(cli.backbone_spec(args))
    data = ElementImages(args.elements, index["elements"], bb.preprocess.element_transform())
    extract_to_store(bb.extractor, bb.key(), data, {"elements": file_digest(index_path)}, args.out,
                     {"elements_index": os.path.abspath(index_path), "classes": index["classes"],
                      "backbone": asdict(bb.spec), "command": cli.command()}, cli.config(ExtractConfig, args),
                     desc="element embeddings", content=lambda: elements_digest(args.elements, index),
                     rebuild=cli.config(RebuildConfig, args))


if __name__ == "__main__":
    cli.run(main, get_args_parser(), dialect=compat.dialect(__file__))
