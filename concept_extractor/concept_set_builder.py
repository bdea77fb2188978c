r"""Build a text concept set (one concept per line) for any class list, filtered for duplicates, length and
near-copies of class names.

    # from a class -> concepts JSON (the format LaBo uses, and concept_library/textual/*.json)
    python -m concept_extractor.concept_set_builder --from_json concept_library/textual/cifar10.json \
        --out concept_library/textual/cifar10_filtered.txt
    # from WordNet's lexical relations (offline: Debian's wordnet-base) for the classes of a dataset or a file
    python -m concept_extractor.concept_set_builder --from_wordnet --classes /data/imagenet --out imagenet_wn.txt

--classes takes a text file (one class per line), an ImageFolder root (its train/ class folders; ImageNet wnids
such as n01440764 are looked up directly), or fashion_mnist / cifar10 / cifar100. A report of every dropped
concept and why is written next to --out as <out>.dropped.json.
"""
import argparse
import json
import os

from utils import cli
from utils.concept_sets import WordNet, filter_concepts, read_class_concepts
from utils.data import get_source
from utils.errors import UserError
from utils.fileio import atomic_write_bytes, atomic_write_json

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "concept_library", "textual")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from_json", help="JSON object of class -> list of concepts")
    src.add_argument("--from_wordnet", action="store_true", help="derive concepts from WordNet relations")
    p.add_argument("--classes", help="with --from_wordnet: a class-list file, an ImageFolder root or a dataset name")
    p.add_argument("--data_root", default="data", help="where the named datasets live")
    p.add_argument("--wordnet", default=None, help="folder with WordNet's data.noun and index.noun")
    p.add_argument("--senses", type=int, default=1, help="WordNet senses per class name to draw from")
    p.add_argument("--max_words", type=int, default=4, help="longest concept in words")
    p.add_argument("--max_chars", type=int, default=40, help="longest concept in characters")
    p.add_argument("--class_similarity", type=float, default=0.85,
                   help="drop concepts this similar (difflib ratio) to a class name")
    p.add_argument("--out", required=True, help="output .txt, one concept per line")
    return p


def class_names(spec, data_root):
    if os.path.isfile(spec):
        with open(spec) as f:
            return [ln.strip() for ln in f if ln.strip()]
    shipped = os.path.join(SHIPPED, f"{spec}.json")
    if os.path.isfile(shipped):           # the class lists of the named datasets, without needing their images
        return list(read_class_concepts(shipped))
    return get_source(spec, "train", data_root).classes


def main(args):
    if args.from_json:
        by_class = read_class_concepts(args.from_json)
    else:
        if not args.classes:
            raise UserError("--from_wordnet needs --classes")
        wn = WordNet(args.wordnet)
        by_class = {c: wn.concepts(c, args.senses) for c in class_names(args.classes, args.data_root)}
        missing = [c for c, v in by_class.items() if not v]
        if missing:
            print(f"no WordNet concepts for {len(missing)} classes: {', '.join(missing[:10])}"
                  + (" ..." if len(missing) > 10 else ""))
    kept, dropped = filter_concepts(by_class, args.max_words, args.max_chars, args.class_similarity)
    if not kept:
        raise UserError("every concept was filtered out")
    atomic_write_bytes(args.out, ("\n".join(kept) + "\n").encode())
    atomic_write_json(args.out + ".dropped.json", dropped)
    reasons = {r: sum(1 for v in dropped.values() if v == r) for r in sorted(set(dropped.values()))}
    print(f"{len(kept)} concepts for {len(by_class)} classes -> {args.out}; dropped: "
          f"{json.dumps(reasons) if reasons else 'none'} (see {args.out}.dropped.json)")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
