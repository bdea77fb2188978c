"""Train the standard linear probe and the sparse Prototype-concept heads over the sparsity x lr grid.

    python -m IP_training.IP_Prototype_training \
        --train_features outputs/features/fashion_mnist/efficientnet_lite0/train \
        --val_features outputs/features/fashion_mnist/efficientnet_lite0/val \
        --concepts outputs/features/fashion_mnist/efficientnet_lite0/elements_segments \
        --out outputs/runs/fashion_mnist/efficientnet_lite0/prototype_segments

Output in --out: results.json (schema in README: one row per head with ratio, lr, top-1, top-5, the epoch kept and
its losses) and heads.pt (torch.load(..., weights_only=True): concepts, the element rows they came from, every head's
parameters). Features stay resident in memory (on the GPU if there is one); all heads of a sweep train together.
"""
import argparse
import os

import numpy as np
import torch

from utils import cli, store
from utils.concepts import SELECTIONS, select_prototypes
from utils.heads import SPARSITY_GRID, LinearProbes, SparseConceptHeads, fit, n_keep
from utils.store import atomic_torch_save, atomic_write_json, key_hash

RESULTS_SCHEMA = "iis.results/1"


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_features", required=True, help="store entry of train features (dataset_feature_extractor)")
    p.add_argument("--val_features", required=True, help="store entry of val features")
    p.add_argument("--concepts", required=True, help="store entry of element embeddings (visual_element_emb_extractor)")
    p.add_argument("--out", required=True, help="output folder for results.json and heads.pt")
    g = p.add_argument_group("concepts")
    g.add_argument("--n_concepts", type=int, default=200, help="number of Prototype concepts (0 = every element)")
    g.add_argument("--concept_selection", default="balanced", choices=SELECTIONS,
                   help="which element embeddings become concepts: balanced = evenly across classes (default, so "
                        "no class is missing from the vocabulary); first = the original code's first-N; random")
    g = p.add_argument_group("training")
    g.add_argument("--ratios", type=float, nargs="+", default=list(SPARSITY_GRID), help="sparsity grid")
    g.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="learning-rate grid (Adam)")
    g.add_argument("--epochs", type=int, default=30, help="epochs; each head keeps its best-val-top-1 epoch")
    g.add_argument("--batch_size", type=int, default=256, help="training batch size")
    g.add_argument("--weight_decay", type=float, default=0.0, help="decoupled weight decay")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and concept choice")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    return p


def load_split(path):
    """(features, labels, meta) of a store entry, with the checks every later step relies on."""
    arrays, meta = store.read(path)
    feats, labels = arrays["features"], arrays["labels"]
    if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels):
        raise cli.UserError(f"{path}: {feats.shape[0] if feats.ndim else 0} feature rows but {len(labels)} labels")
    return feats, labels, meta


def check_compatible(train_meta, val_meta, concept_meta, dims):
    bb = [m["key"]["backbone"] for m in (train_meta, val_meta, concept_meta)]
    if not bb[0] == bb[1] == bb[2]:
        raise cli.UserError("train, val and concept features come from different backbones/layers/preprocessing")
    if len(set(dims)) != 1:
        raise cli.UserError(f"feature dimensions differ: train/val/concepts = {dims}")
    if train_meta["info"].get("classes") != val_meta["info"].get("classes"):
        raise cli.UserError("train and val features have different class lists")


def main(args):
    for r in args.ratios:
        if not 0 <= r < 1:
            raise cli.UserError(f"sparsity ratios must be in [0, 1), got {r}")
    if len(set(args.ratios)) < 2:
        raise cli.UserError("give at least two sparsity ratios (IIS is an area under the curve over them)")
    xtr, ytr, mtr = load_split(args.train_features)
    xva, yva, mva = load_split(args.val_features)
    emb, emb_labels, mco = load_split(args.concepts)
    check_compatible(mtr, mva, mco, (xtr.shape[1], xva.shape[1], emb.shape[1]))
    classes = mtr["info"]["classes"]
    rows = select_prototypes(emb_labels, args.n_concepts, args.concept_selection, args.seed)
    ratios, lrs = sorted(set(args.ratios)), sorted(set(args.lrs))
    key = {"schema": RESULTS_SCHEMA, "train": mtr["key_hash"], "val": mva["key_hash"], "concepts": mco["key_hash"],
           "n_concepts": args.n_concepts, "concept_selection": args.concept_selection, "ratios": ratios, "lrs": lrs,
           "epochs": args.epochs, "batch_size": args.batch_size, "weight_decay": args.weight_decay, "seed": args.seed}
    results_path = os.path.join(args.out, "results.json")
    if os.path.exists(results_path) and store.read_json(results_path).get("key_hash") == key_hash(key):
        print(f"{results_path} is up to date")
        return
    device = cli.resolve_device(args.device)
    torch.manual_seed(args.seed)
    to = dict(device=device)
    xtr_t, ytr_t = torch.as_tensor(np.asarray(xtr), **to), torch.as_tensor(np.asarray(ytr), **to)
    xva_t, yva_t = torch.as_tensor(np.asarray(xva), **to), torch.as_tensor(np.asarray(yva), **to)
    concepts = torch.as_tensor(np.asarray(emb)[rows], **to)
    n_classes, k = len(classes), len(rows)
    print(f"{len(ytr)} train / {len(yva)} val samples, {xtr.shape[1]}-d features, {n_classes} classes, "
          f"{k} concepts ({args.concept_selection}), {len(ratios)} ratios x {len(lrs)} lrs on {device}")

    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, weight_decay=args.weight_decay)
    probes = LinearProbes(xtr.shape[1], n_classes, len(lrs), args.seed).to(device)
    std = fit(probes, lrs, xtr_t, ytr_t, xva_t, yva_t, desc="standard probe", **common)
    grid = [(r, lr) for r in ratios for lr in lrs]
    heads = SparseConceptHeads(concepts, n_classes, [r for r, _ in grid], args.seed).to(device)
    con = fit(heads, [lr for _, lr in grid], xtr_t, ytr_t, xva_t, yva_t, desc="concept heads", **common)

    def row(res, h, **extra):
        return dict(extra, top1=float(res["top1"][h]), top5=float(res["top5"][h]), epoch=int(res["epoch"][h]),
                    train_loss=float(res["train_loss"][h]), val_loss=float(res["val_loss"][h]))
    runs = [row(std, h, head="standard", ratio=None, lr=lr) for h, lr in enumerate(lrs)]
    runs += [row(con, h, head="concept", ratio=r, lr=lr, n_active=n_keep(r, k)) for h, (r, lr) in enumerate(grid)]
    os.makedirs(args.out, exist_ok=True)
    atomic_torch_save(os.path.join(args.out, "heads.pt"), {
        "concepts": heads.concepts.cpu(), "concept_rows": torch.as_tensor(rows), "ratios": torch.tensor(ratios),
        "lrs": torch.tensor(lrs), "grid": torch.tensor(grid),
        **{f"concept.{n}": p.detach().cpu() for n, p in heads.named_parameters()},
        **{f"standard.{n}": p.detach().cpu() for n, p in probes.named_parameters()}})
    spec = mtr["info"]["backbone"]
    meta = {"backbone": spec["name"], "arch": spec["arch"], "weights": spec["weights"], "layer": spec["layer"],
            "pooling": spec["pooling"], "dataset": mtr["info"].get("dataset"), "concept_type": "prototype",
            "elements": mco["info"].get("elements_index"), "classes": classes, "n_concepts": k,
            "n_train": len(ytr), "n_val": len(yva), "feature_dim": int(xtr.shape[1]), "device": str(device),
            "inputs": {"train": os.path.abspath(args.train_features), "val": os.path.abspath(args.val_features),
                       "concepts": os.path.abspath(args.concepts)}}
    atomic_write_json(results_path, {"schema": RESULTS_SCHEMA, "key": key, "key_hash": key_hash(key), "meta": meta,
                                     "sparsity_grid": ratios, "lr_grid": lrs, "runs": runs})
    best = max(r["top1"] for r in runs if r["head"] == "standard")
    print(f"standard top-1 {best:.2f}%; concept heads at s={ratios[0]}: "
          f"{max(r['top1'] for r in runs if r['ratio'] == ratios[0]):.2f}% -> {results_path}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
