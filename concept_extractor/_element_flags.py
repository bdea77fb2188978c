"""Flags shared by the two element extractors."""
from utils.cli import add_dataset_args


def add_element_args(parser):
    add_dataset_args(parser)
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="cut elements from this folder of class folders (DIR/<class>/*.jpg) instead of the train "
                             "split of --dataset; the original code's --data_root DIR means this")
    g = parser.add_argument_group("elements")
    g.add_argument("--images_per_class", type=int, default=10,
                   help="training images per class to cut elements from (a seeded choice)")
    g.add_argument("--seed", type=int, default=0, help="seed of the image choice")
    g.add_argument("--image_size", type=int, default=224, help="images are resized to this square size before cutting")
    g.add_argument("--out_size", type=int, default=224, help="side of the saved element images")
    g.add_argument("--min_side", type=int, default=8,
                   help="images whose short side is below this many pixels are skipped (and counted): there is "
                        "nothing to segment in them")
    g.add_argument("--workers", type=int, default=1, help="processes cutting images in parallel")
    g.add_argument("--out_dir", default="concept_library/prototype",
                   help="the library root; elements go to <out_dir>/<segments|patches>/<class>/")
    return g


def run_extractor(args, method, cut, params):
    """Shared main of the element extractors."""
    from utils.cli import UserError
    from utils.data import class_folder_source, get_source
    from utils.elements import build_library
    if args.images_per_class < 1 or args.workers < 1:
        raise UserError("--images_per_class and --workers must be at least 1")
    source = class_folder_source(args.images) if args.images else get_source(args.dataset, "train", args.data_root)
    build_library(source, method, cut, params, args.out_dir, args.images_per_class, args.seed, args.image_size,
                  args.workers, args.min_side)
