r"""Print the folder name a backbone's features and runs get (utils/specs.model_tag), so the runners name them the way
the Python stages do.

    python scripts/model_tag.py timm:convnext_tiny.fb_in1k --layer stages.3      # timm_convnext_tiny.fb_in1k@stages.3

NAME is the --backbone value when one is given, else the --model_config value (a model_configs/ name or a YAML path).
"""
import argparse

from utils import cli
from utils.specs import model_tag


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="the --backbone value, or the --model_config value")
    p.add_argument("--layer", default="", help="the --layer value, if any")
    return p


def main(args):
    print(model_tag(args.name, args.layer or None))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
