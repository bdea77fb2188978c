"""Cut grid patches (visual elements) from a few images per class and save them as images, with an index.

    python -m concept_extractor.patch_extractor --dataset fashion_mnist --images_per_class 4 --grids 2 3

Output: concept_library/prototype/patches/<class>/*.png and concept_library/prototype/patches/index.json.
"""
import argparse
from functools import partial

from utils import cli, compat
from utils.cli import flags
from utils.elements import patches
from utils.errors import UserError
from utils.library import LibraryConfig, build
from utils.validate import RebuildConfig


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_element_args(p)
    p.add_argument("--grids", type=int, nargs="+", default=[2, 3],
                   help="grid sizes g: each image gives g x g patches per g")
    return p


def main(args):
    if min(args.grids) < 1:
        raise UserError("--grids must be at least 1")
    params = dict(grids=list(args.grids), out_size=args.out_size)
    build(cli.config(LibraryConfig, args), "patches", partial(patches, **params), params,
          cli.config(RebuildConfig, args), cli.command())


if __name__ == "__main__":
    cli.run(main, get_args_parser(), dialect=compat.dialect(__file__))
