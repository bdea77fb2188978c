"""Cut SLIC superpixel segments (the visual elements of Prototype/Cluster/End-to-end concepts) from a few images per
class and save them as images, with an index recording where each came from.

    python -m concept_extractor.segment_extractor --dataset fashion_mnist --images_per_class 4

Output: concept_library/prototype/segments/<class>/*.png and concept_library/prototype/segments/index.json
(schema in utils/library.py). Re-running with the same settings does nothing; a killed run resumes by class.
"""
import argparse
from functools import partial

from utils import cli, compat
from utils.cli import flags
from utils.elements import FILL, SLIC_SCALES, segments
from utils.library import LibraryConfig, build
from utils.validate import RebuildConfig


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_element_args(p)
    g = p.add_argument_group("SLIC")
    g.add_argument("--n_segments", type=int, nargs="+", default=list(SLIC_SCALES), help="SLIC scales (n_segments)")
    g.add_argument("--compactness", type=float, default=10.0, help="SLIC compactness")
    g.add_argument("--sigma", type=float, default=1.0, help="SLIC Gaussian smoothing")
    g.add_argument("--max_per_scale", type=int, default=5, help="masks kept per scale, largest first")
    g.add_argument("--max_jaccard", type=float, default=0.5,
                   help="a mask overlapping a kept one by more than this Jaccard index is dropped")
    g.add_argument("--min_area", type=float, default=0.001, help="masks covering less of the image are dropped")
    g.add_argument("--fill", type=int, default=FILL, help="grey value outside the mask")
    return p


def main(args):
    params = dict(scales=list(args.n_segments), compactness=args.compactness, sigma=args.sigma,
                  max_per_scale=args.max_per_scale, max_jaccard=args.max_jaccard, min_area=args.min_area,
                  fill=args.fill, out_size=args.out_size)
    build(cli.config(LibraryConfig, args), "segments", partial(segments, **params), params,
          cli.config(RebuildConfig, args), cli.command())


if __name__ == "__main__":
    cli.run(main, get_args_parser(), dialect=compat.dialect(__file__))
