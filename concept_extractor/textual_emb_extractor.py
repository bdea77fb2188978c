r"""CLIP features for text concepts: the concepts' text embeddings and the train/val images' CLIP image embeddings
(the targets the text path's projection learns to reproduce from the backbone).

    python -m concept_extractor.textual_emb_extractor --concepts concept_library/textual/fashion_mnist.json \
        --dataset fashion_mnist --max_train 2000 --max_val 1000 \
        --clip_model ViT-B-16 --clip_pretrained openai --out outputs/features/fashion_mnist/clip

--clip_pretrained takes an open_clip tag (openai, laion2b_s34b_b88k, ...), a local checkpoint file, or 'none' (random
weights: plumbing only). --clip_model may also be an open_clip model-config JSON. Use the same --max_train/--max_val/
--seed as the backbone's dataset_feature_extractor run, so rows line up (IP_Text_training checks).

With --backbone_out it first extracts the backbone's train/val features too (as dataset_feature_extractor does, same
subsets), as the original code's textual_emb_extractor did; its command works here from inside concept_extractor/:

    python textual_emb_extractor.py --dataset imagenet --concept_set ../concept_library/textual/imagenet_filtered.txt \
        --backbone resnet50 --activation_dir ./embs/resnet50/ --feature_layer layer4

writes embs/resnet50/imagenet_{train,val}_resnet50_layer4 (the entries its IP_Prototype_training --train_pt/--val_pt
name) and then the CLIP features to embs/resnet50/imagenet_clip_imagenet_filtered (utils/aliases.py).

Output in --out: store entries text/ (features (C, d) unit-norm; info.concepts = the C concept strings), train/ and
val/ (features (N, d) unit-norm CLIP image embeddings, labels, indices).
"""
import argparse
import hashlib
import os

import numpy as np

from utils import cli, store
from utils.extraction import extract_to_store
from utils.data import TransformedImages, get_source, subset_indices, subset_key
from utils.text import CLIP, read_concepts


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", required=True, help="concept file: .txt (one per line) or .json (list, or class -> "
                                                     "concepts as LaBo writes them)")
    p.add_argument("--clip_model", default="ViT-B-16", help="open_clip model name, or a model-config JSON path")
    p.add_argument("--clip_pretrained", default="openai", help="open_clip pretrained tag, a checkpoint file, or none")
    cli.add_dataset_args(p)
    p.add_argument("--max_train", type=int, default=None, help="seeded subset of the train split (as for the backbone)")
    p.add_argument("--max_val", type=int, default=None, help="seeded subset of the val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    p.add_argument("--out", required=True, help="folder for the text/, train/ and val/ store entries")
    g = p.add_argument_group("backbone features (optional)")
    g.add_argument("--backbone_out", default=None, metavar="PATH_WITH_{split}",
                   help="also extract the backbone's train and val features into these store entries ({split} = train, "
                        "val), before CLIP's")
    cli.add_backbone_args(p)
    cli.add_loader_args(p)
    return p


def backbone_features(args):
    """The backbone's train/val features, by dataset_feature_extractor itself (same subsets as the CLIP features)."""
    from concept_extractor import dataset_feature_extractor as dfe
    if "{split}" not in args.backbone_out:
        raise cli.UserError(f"--backbone_out {args.backbone_out} must contain {{split}} (train and val get one each)")
    outs = []
    for split, n in (("train", args.max_train), ("val", args.max_val)):
        argv = ["--model_config", args.model_config, "--dataset", args.dataset, "--data_root", args.data_root,
                "--split", split, "--seed", str(args.seed), "--out", args.backbone_out.replace("{split}", split),
                "--batch_size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
                "--dtype", args.dtype, "--chunk_size", str(args.chunk_size), "--amp" if args.amp else "--no-amp"]
        for flag in ("backbone", "weights", "layer", "pooling"):
            if getattr(args, flag):
                argv += [f"--{flag}", getattr(args, flag)]
        if n:
            argv += ["--max_images", str(n)]
        outs.append(argv[argv.index("--out") + 1])
        dfe.main(dfe.get_args_parser().parse_args(argv))
    return outs


def main(args):
    device = cli.resolve_device(args.device)
    done = backbone_features(args) if args.backbone_out else []
    try:
        concepts = read_concepts(args.concepts)
        clip = CLIP(args.clip_model, args.clip_pretrained, str(device))
    except cli.UserError as e:    # the backbone features stay: the visual concepts need only them
        raise cli.UserError(f"{e}" + (f" (the backbone features are done: {', '.join(done)})" if done else "")) \
            from None
    text_key = {"schema": 1, "clip": clip.key, "concepts": hashlib.sha256("\n".join(concepts).encode()).hexdigest()}
    text_out = os.path.join(args.out, "text")
    if store.is_current(text_out, text_key):
        print(f"{text_out} is up to date")
    else:
        feats = clip.encode_text(concepts)
        store.write(text_out, {"features": feats}, text_key, {"concepts": concepts, "source": args.concepts})
        print(f"{len(concepts)} concepts x {feats.shape[1]} -> {text_out}")
    for split, n in (("train", args.max_train), ("val", args.max_val)):
        source = get_source(args.dataset, split, args.data_root)
        idx = subset_indices(len(source), n, args.seed)
        data_key = subset_key(source, idx)
        extract_to_store(clip.image_encoder, clip.key, TransformedImages(source, idx, clip.preprocess), data_key,
                         os.path.join(args.out, split), {"classes": source.classes, "dataset": source.name,
                                                         "split": split}, args, desc=f"CLIP {split} images",
                         extra_arrays={"indices": np.asarray(idx, np.int64)})


if __name__ == "__main__":
    cli.run(main, get_args_parser())
