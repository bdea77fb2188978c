r"""Extract pooled features of one or several backbones, at one or several layers each, for a dataset split (a seeded
subset if asked), decoding every image once and running every backbone once per batch.

    python -m concept_extractor.dataset_feature_extractor --model_config efficientnet_lite0 \
        --dataset fashion_mnist --split train --max_images 2000 \
        --out outputs/features/fashion_mnist/efficientnet_lite0/train

    # three backbones, two layers of one of them, in one pass: one entry per (backbone, layer)
    python -m concept_extractor.dataset_feature_extractor \
        --model_config resnet50 resnet50:layer3 vit_b_16 --dataset /data/imagenet --split val \
        --out 'outputs/features/imagenet/{model}/{split}'

    # ImageNet on one GPU without a decoded copy: JPEGs decoded, resized and normalised on the GPU
    python -m concept_extractor.dataset_feature_extractor --model_config resnet50 --dataset /data/imagenet \
        --split train --decode gpu --workers 14 --batch_size 256 --out outputs/features/imagenet/resnet50/train

Backbones: each --model_config is a model_configs/ name (or YAML path), optionally with :LAYER; --layer x y z reads
those layers of every backbone given without one. Backbones with the same architecture and weights run once with all
their layers hooked; backbones with the same preprocessing share one transformed batch.

Output: a store entry (utils/store.py) per (backbone, layer) with features (N, D) float32, labels (N,) int64 and
indices (N,) int64 (rows of the split), keyed by backbone, weights, layer, pooling, preprocessing, dataset, split and
subset — the same bytes a separate run of each writes (but for the command recorded in meta.json's info). --out is
the entry for one (backbone, layer); for several, a parent folder (entries at <out>/<model>[@<layer>]/<split>,
run_pipeline.sh's layout under outputs/features/<dataset>) or a template with {model}, {split} and {dataset}. <model> is the config's name (the --backbone name with ':' as '_'),
with @<layer> when a layer was named (utils/specs.model_tag).

--decode cache (the fast path for GPUs) first writes a one-time uint8 copy of the split, decoded and resized once at
the largest size the backbones need, under --decode_cache; batches are then cut and normalised on the device. See
docs/scale.md, "Where a GPU waits: decoding", for its numerical difference; its entries are keyed apart from the
default PIL path's.

--decode gpu (no decoded copy) has loader workers read file bytes only; JPEGs are decoded in batches on the GPU (nvJPEG)
and resized, cropped and normalised there with each backbone's own preprocessing; other files (PNG, greyscale, CMYK
or progressive JPEGs, ...) take the PIL path, counted in the summary line and the entries' info (utils/decode.py).
Its entries are keyed apart too. Without a CUDA device it says so in one line and uses the PIL path.

An image PIL cannot read (corrupt, truncated, a decompression bomb) is skipped: left out of features, labels and
indices alike, counted in the summary line and listed in the entry's info (``skipped``); --strict stops at it with
one error naming it instead. --force re-extracts entries that look current; --verify also compares the images' bytes
with the digest recorded at extraction (docs/files.md, "What is checked").
"""
import argparse
import os
from dataclasses import asdict

import numpy as np

from utils import cli, compat
from utils.cli import flags
from utils.data import get_source, subset_indices, subset_key
from utils.decode import DecodeConfig, GpuFeed, choose
from utils.device import resolve_device
from utils.errors import UserError
from utils.extraction import ExtractConfig, backbone_passes, extract_passes
from utils.feeds import (CacheFeed, GroupedImages, ImageFeed, build_decoded_cache, cache_key, describe_row,
                         plan_cache)
from utils.fileio import key_hash
from utils.layout import model_folder
from utils.specs import config_path, load_spec
from utils.validate import RebuildConfig


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_backbone_args(p, several=True)
    flags.add_dataset_args(p)
    p.add_argument("--split", default="train", choices=["train", "val"], help="which split")
    p.add_argument("--max_images", type=int, default=None, help="a seeded random subset of this many images")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")
    p.add_argument("--out", required=True,
                   help="one (backbone, layer): the store entry folder; several: a parent folder (entries at "
                        "<out>/<model>[@<layer>]/<split>) or a template with {model}, {split}, {dataset}")
    flags.add_decode_args(p)
    flags.add_strict_arg(flags.add_loader_args(p))
    flags.add_rebuild_args(p, reads="the images' bytes")
    return p


def targets(args):
    """[(tag, spec)] for every (backbone, layer) asked for, in order; names are checked before any data is touched."""
    items = []
    for mc in args.model_config:
        name, layer = mc, None
        if ":" in mc and config_path(mc) is None:
            name, layer = mc.split(":", 1)
            if not layer:
                raise UserError(f"--model_config {mc!r}: no layer after ':'")
        for lay in ([layer] if layer else (args.layer or [None])):
            items.append((name, lay))
    if args.backbone and len({n for n, _ in items}) > 1:
        raise UserError("--backbone replaces the architecture of one model config; with several, put each "
                            "architecture in its own model config")
    out = [(model_folder(args.backbone or name, lay, args.weights), load_spec(name, args.backbone, args.weights, lay, args.pooling))
           for name, lay in items]
    tags = [t for t, _ in out]
    dup = sorted({t for t in tags if tags.count(t) > 1})
    if dup:
        raise UserError(f"{dup[0]} is asked for twice")
    return out


def out_paths(out, tags, split, dataset):
    """Entry folder of each tag: ``out`` itself for one tag, else a template's fill or <out>/<tag>/<split>."""
    if "{" in out:
        try:
            paths = [out.format(model=t, split=split, dataset=dataset) for t in tags]
        except (KeyError, IndexError, ValueError, AttributeError):
            raise UserError(f"--out {out!r}: a template may use {{model}}, {{split}} and {{dataset}} only") \
                from None
        if len(set(paths)) < len(paths):
            raise UserError(f"--out {out!r} gives several entries one folder: put {{model}} in it")
        return paths
    if len(tags) == 1:
        return [out]
    return [os.path.join(out, t, split) for t in tags]


def main(args):
    chosen = targets(args)
    source = get_source(args.dataset, args.split, args.data_root)
    idx = subset_indices(len(source), args.max_images, args.seed)
    data_key = subset_key(source, idx)
    tag_data = os.path.basename(args.dataset.rstrip("/"))
    outs = out_paths(args.out, [t for t, _ in chosen], args.split, tag_data)
    info = {"classes": source.classes, "dataset": source.name, "split": args.split,
            "data_root": os.path.abspath(args.data_root), "command": cli.command()}
    passes, groups = backbone_passes([(spec, out, dict(info, backbone=asdict(spec)), tag)
                                      for (tag, spec), out in zip(chosen, outs)])
    dec, run = cli.config(DecodeConfig, args), cli.config(ExtractConfig, args)
    device = resolve_device(run.device)
    how = choose(dec.decode, device)
    probe = GroupedImages(source, idx, [])
    if how == "pil":
        feed = ImageFeed(GroupedImages(source, idx, [g.image_transform() for g in groups]), run.workers)
    elif how == "gpu":
        feed = GpuFeed(source, idx, groups, device, run.workers, lambda r: describe_row(probe, r),
                       half=device.type == "cuda" and run.amp)
    else:
        plan = plan_cache([p.preprocess for p in passes])
        path = os.path.join(dec.decode_cache, tag_data,
                            f"{args.split}-{plan.resize}-{plan.crop}-{plan.interpolation}-"
                            f"{key_hash(cache_key(data_key, plan))[:8]}")
        images, labels = build_decoded_cache(path, source, idx, data_key, plan, run.workers)
        feed = CacheFeed(images, labels, plan, groups, probe, threads=run.workers)
    rebuild = cli.config(RebuildConfig, args)
    extract_passes(passes, feed, data_key, run, desc=f"{args.split} features",
                   extra_arrays={"indices": np.asarray(idx, np.int64)}, content=source.content_digest,
                   verify=rebuild.verifying, force=rebuild.force, strict=args.strict)


if __name__ == "__main__":
    cli.run(main, get_args_parser(), dialect=compat.dialect(__file__))
