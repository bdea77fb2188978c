"""Flags shared by the two element extractors."""
from utils.cli import add_dataset_args


def add_element_args(parser):
    add_dataset_args(parser)
    g = parser.add_argument_group("elements")
    g.add_argument("--images_per_class", type=int, default=10,
                   help="training images per class to cut elements from (a seeded choice)")
    g.add_argument("--seed", type=int, default=0, help="seed of the image choice")
    g.add_argument("--image_size", type=int, default=224, help="images are resized to this square size before cutting")
    g.add_argument("--out_size", type=int, default=224, help="side of the saved element images")
    g.add_argument("--out_dir", default="concept_library/prototype",
                   help="the library root; elements go to <out_dir>/<segments|patches>/<class>/")
    return g
