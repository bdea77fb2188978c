r"""The fine-tuning comparison table from a manifest of scored runs (scripts/finetune_compare.sh writes both).

    python -m IP_training.IP_finetune_compare outputs/finetune/fashion_mnist/efficientnet_lite0/manifest.tsv \
        --out outputs/reports/finetune_fashion_mnist_efficientnet_lite0

The manifest has one tab-separated line per scored run: arm (pretrained, plain, interp, or any other name), lambda
(empty or - for none), seed, and the run folder holding its iis.json (iis_computing.py). Output in --out:
finetune_compare.md (per arm and lambda, mean ± std over seeds of standard top-1, IIS and top-1 at s = 0.1 and 0.9, the
paired difference to the plain arm at the same seed and in how many seeds it wins; then every run) and
finetune_compare.csv (the same numbers).
"""
import argparse

from utils import cli
from utils.finetune.compare import write_comparison


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="tab-separated: arm, lambda, seed, run folder (one line per scored run)")
    p.add_argument("--out", required=True, help="folder for finetune_compare.md and finetune_compare.csv")
    return p


def main(args):
    write_comparison(args.manifest, args.out)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
