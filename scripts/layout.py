r"""Print, one ``name=path`` a line, the folders a pipeline run uses (the naming rule is utils/layout.py), so the
runners name them exactly as the Python side does and no bash repeats the rule.

    python scripts/layout.py --dataset fashion_mnist --model efficientnet_lite0 --train_size 2000 --val_size 1000 \
        --images_per_class 4 --concept_types "prototype cluster"

prints data_tag, subset_tag, model_tag, lib_tag, library_dir, features, elements_features, features_template,
clip, runs, reports (the folder of this data's reports), then run_<type> (the run folder of each concept type),
with --report NAME report and with --finetune 'k=v ...' finetune (the fine-tuning comparison's folder). With --lib_tag it
prints only each concept type's run folder name and the overlay's file name, plot= (scripts/train_heads.sh):

    python scripts/layout.py --lib_tag segments_ipc4_seed0 --concept_types "prototype text" --epochs 5
"""
import argparse

from utils import cli, layout
from utils.errors import UserError


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs")
    p.add_argument("--library", default="concept_library/prototype")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default="efficientnet_lite0", help="the --backbone value, else the --model_config value")
    p.add_argument("--layer", default="")
    p.add_argument("--weights", default="", help="the --weights override, if any (a file is keyed by its bytes)")
    p.add_argument("--train_size", default="0")
    p.add_argument("--val_size", default="0")
    p.add_argument("--elements", default="segments", help="segments or patches")
    p.add_argument("--images_per_class", default="10")
    p.add_argument("--element_seed", default="0")
    p.add_argument("--clip_model", default="ViT-B-16")
    p.add_argument("--clip_pretrained", default="openai")
    p.add_argument("--lib_tag", default="", help="print only the run folder names <type>=NAME for this element set")
    p.add_argument("--concept_types", default="", help="space-separated: prints run_<type> for each")
    p.add_argument("--finetune", default="", help="'NAME=VALUE ...' of a fine-tuning comparison: prints finetune=")
    p.add_argument("--report", default="", help="a report's name: prints report=<out>/reports/<data>/<subset>/NAME")
    for name in layout.TRAINING_DEFAULTS:
        p.add_argument(f"--{name}", default=layout.TRAINING_DEFAULTS[name], help="a training setting (run key)")
    return p


def main(args):
    settings = {k: getattr(args, k) for k in layout.TRAINING_DEFAULTS}
    if args.lib_tag:
        for ct in args.concept_types.split():
            print(f"{ct}={layout.run_name(ct, args.lib_tag, **settings)}")
        print(f"plot=iis_{args.lib_tag}_{'+'.join(args.concept_types.split())}{layout.training_tag(**settings)}.png")
        return
    found = layout.paths(args.out, args.library, args.dataset, args.model, args.layer or None, args.weights or None,
                         args.train_size, args.val_size, args.elements, args.images_per_class, args.element_seed,
                         args.clip_model, args.clip_pretrained)
    for ct in args.concept_types.split():
        found[f"run_{ct}"] = f"{found['runs']}/{layout.run_name(ct, found['lib_tag'], **settings)}"
    found["reports"] = layout.report_dir(args.out, args.dataset, args.train_size, args.val_size, "")
    if args.finetune:
        settings = dict(kv.partition("=")[::2] for kv in args.finetune.split())
        found["finetune"] = layout.finetune_dir(args.out, args.dataset, found["model_tag"], args.train_size,
                                                args.val_size, settings)
    if args.report:
        found["report"] = layout.report_dir(args.out, args.dataset, args.train_size, args.val_size, args.report)
    for k, v in found.items():
        if "\n" in v:
            raise UserError(f"a path with a line break: {v!r}")
        print(f"{k}={v}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
