r"""The element seed of a fine-tuning comparison's unseen library (utils/finetune/unseen.py), printed as
``unseen_seed=N`` and ``disjoint_from_subset=0|1``; with --check A B, refuse (exit 2) two element libraries that share
a source image.

    python scripts/unseen_seed.py --dataset fashion_mnist --images_per_class 2 --train_size 1000
    python scripts/unseen_seed.py --check LIBRARY_A/segments LIBRARY_B/segments
"""
import argparse

from utils import cli
from utils.errors import UserError
from utils.finetune.unseen import disjoint_seed, shared_sources


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data_root", default="data")
    p.add_argument("--images_per_class", type=int, default=10)
    p.add_argument("--element_seed", type=int, default=0, help="the training library's seed")
    p.add_argument("--train_size", type=int, default=0, help="the fine-tuning's train subset (0 = the whole split)")
    p.add_argument("--subset_seed", type=int, default=0, help="the fine-tuning's subset seed")
    p.add_argument("--check", nargs=2, metavar="LIBRARY", help="two element library folders (holding index.json)")
    return p


def main(args):
    if args.check:
        shared = shared_sources(*args.check)
        if shared:
            raise UserError(f"{args.check[1]} shares {len(shared)} source image(s) with {args.check[0]} (first: "
                            f"{shared[0]}); give the unseen library another --element_seed")
        print(f"disjoint: {args.check[0]} and {args.check[1]} share no source image")
        return
    seed, partial = disjoint_seed(args.dataset, args.data_root, args.images_per_class, args.element_seed,
                                  args.train_size, args.subset_seed)
    print(f"unseen_seed={seed}")
    print(f"disjoint_from_subset={int(partial)}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
