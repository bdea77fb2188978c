"""Train the standard linear probe and sparse concept heads (Prototype, Cluster or End-to-end) over the sparsity x lr
grid.

    python -m IP_training.IP_Prototype_training \
        --train_features outputs/features/fashion_mnist/efficientnet_lite0/train \
        --val_features outputs/features/fashion_mnist/efficientnet_lite0/val \
        --concepts outputs/features/fashion_mnist/efficientnet_lite0/elements_segments \
        --concept_type prototype --out outputs/runs/fashion_mnist/efficientnet_lite0/prototype_segments

Concept types: prototype = element embeddings themselves; cluster = KMeans centres of them; end2end = a hard
Gumbel-softmax assignment of elements to concepts learnt together with each head.

Output in --out: results.json (schema in README: one row per head with ratio, lr, top-1, top-5, the epoch kept and
its losses) and heads.pt (torch.load(..., weights_only=True): concepts, the element rows they came from, every head's
parameters). Features stay resident in memory (on the GPU if there is one); all heads of a sweep train together.
"""
import argparse
import os

import numpy as np
import torch

from utils import cli, store
from utils.concepts import SELECTIONS, cluster_centres, select_prototypes
from utils.heads import SPARSITY_GRID, End2EndConceptHeads, LinearProbes, SparseConceptHeads, fit, n_keep
from utils.store import atomic_torch_save, atomic_write_json, key_hash

RESULTS_SCHEMA = "iis.results/1"
CONCEPT_TYPES = ("prototype", "cluster", "end2end")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_features", required=True, help="store entry of train features (dataset_feature_extractor)")
    p.add_argument("--val_features", required=True, help="store entry of val features")
    p.add_argument("--concepts", required=True, help="store entry of element embeddings (visual_element_emb_extractor)")
    p.add_argument("--out", required=True, help="output folder for results.json and heads.pt")
    g = p.add_argument_group("concepts")
    g.add_argument("--concept_type", default="prototype", choices=CONCEPT_TYPES, help="where concepts come from")
    g.add_argument("--n_concepts", type=int, default=200,
                   help="number of concepts (prototype: 0 = every element)")
    g.add_argument("--concept_selection", default="balanced", choices=SELECTIONS,
                   help="prototype: which element embeddings become concepts: balanced = evenly across classes "
                        "(default, so no class is missing from the vocabulary); first = the original code's first-N; "
                        "random. end2end: how its candidate pool is drawn")
    g.add_argument("--e2e_pool", type=int, default=2000,
                   help="end2end: candidate elements the assignment chooses from (memory grows with pool x concepts "
                        "x heads)")
    g.add_argument("--tau", type=float, default=0.1, help="end2end: Gumbel-softmax temperature")
    g.add_argument("--e2e_gain", type=float, default=5.0,
                   help="end2end: initial gain of the LayerNorm on the assignment logits (how sharp the initial "
                        "partition around the seed elements is; see utils/heads.py)")
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


def make_heads(args, emb, emb_labels, n_classes, head_ratios, device):
    """The sweep's concept heads, the element rows behind their concepts, and the number of concepts."""
    if args.concept_type == "prototype":
        rows = select_prototypes(emb_labels, args.n_concepts, args.concept_selection, args.seed)
        heads = SparseConceptHeads(torch.as_tensor(emb[rows]), n_classes, head_ratios, args.seed)
    elif args.concept_type == "cluster":
        centres, rows = cluster_centres(emb, args.n_concepts, args.seed)
        heads = SparseConceptHeads(torch.as_tensor(centres), n_classes, head_ratios, args.seed)
    else:
        rows = select_prototypes(emb_labels, args.e2e_pool, args.concept_selection, args.seed)
        if args.n_concepts > len(rows):
            raise cli.UserError(f"{args.n_concepts} end2end concepts need at least as many candidate elements, "
                                f"have {len(rows)}")
        seeds = select_prototypes(emb_labels[rows], args.n_concepts, args.concept_selection, args.seed)
        heads = End2EndConceptHeads(torch.as_tensor(emb[rows]), seeds, n_classes, head_ratios, args.seed, args.tau,
                                    args.e2e_gain)
    return heads.to(device), rows, heads.ln_weight.shape[1]


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
    if args.n_concepts < 0 or (args.concept_type != "prototype" and args.n_concepts < 1):
        raise cli.UserError(f"--n_concepts must be positive for {args.concept_type} concepts")
    ratios, lrs = sorted(set(args.ratios)), sorted(set(args.lrs))
    key = {"schema": RESULTS_SCHEMA, "train": mtr["key_hash"], "val": mva["key_hash"], "concepts": mco["key_hash"],
           "concept_type": args.concept_type, "n_concepts": args.n_concepts,
           "concept_selection": args.concept_selection, "ratios": ratios, "lrs": lrs,
           "epochs": args.epochs, "batch_size": args.batch_size, "weight_decay": args.weight_decay, "seed": args.seed}
    if args.concept_type == "end2end":
        key.update(e2e_pool=args.e2e_pool, tau=args.tau, e2e_gain=args.e2e_gain)
    results_path = os.path.join(args.out, "results.json")
    if os.path.exists(results_path) and store.read_json(results_path).get("key_hash") == key_hash(key):
        print(f"{results_path} is up to date")
        return
    device = cli.resolve_device(args.device)
    torch.manual_seed(args.seed)
    to = dict(device=device)
    xtr_t, ytr_t = torch.as_tensor(np.asarray(xtr), **to), torch.as_tensor(np.asarray(ytr), **to)
    xva_t, yva_t = torch.as_tensor(np.asarray(xva), **to), torch.as_tensor(np.asarray(yva), **to)
    n_classes = len(classes)
    grid = [(r, lr) for r in ratios for lr in lrs]
    heads, rows, k = make_heads(args, np.asarray(emb), emb_labels, n_classes, [r for r, _ in grid], device)
    print(f"{len(ytr)} train / {len(yva)} val samples, {xtr.shape[1]}-d features, {n_classes} classes, "
          f"{k} {args.concept_type} concepts, {len(ratios)} ratios x {len(lrs)} lrs on {device}")

    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, weight_decay=args.weight_decay)
    probes = LinearProbes(xtr.shape[1], n_classes, len(lrs), args.seed).to(device)
    std = fit(probes, lrs, xtr_t, ytr_t, xva_t, yva_t, desc="standard probe", **common)
    con = fit(heads, [lr for _, lr in grid], xtr_t, ytr_t, xva_t, yva_t, desc="concept heads", **common)

    def row(res, h, **extra):
        return dict(extra, top1=float(res["top1"][h]), top5=float(res["top5"][h]), epoch=int(res["epoch"][h]),
                    train_loss=float(res["train_loss"][h]), val_loss=float(res["val_loss"][h]))
    runs = [row(std, h, head="standard", ratio=None, lr=lr) for h, lr in enumerate(lrs)]
    runs += [row(con, h, head="concept", ratio=r, lr=lr, n_active=n_keep(r, k)) for h, (r, lr) in enumerate(grid)]
    os.makedirs(args.out, exist_ok=True)
    heads.eval()
    with torch.no_grad():
        concepts = heads.concept_matrix().cpu()
    provenance = {"concept_rows": torch.as_tensor(rows)}
    if args.concept_type == "end2end":   # per head, the concept each pool element (concept_rows) went to
        provenance["assignment"] = heads.assignment().argmax(-1).cpu()
    atomic_torch_save(os.path.join(args.out, "heads.pt"), {
        "concepts": concepts, **provenance, "ratios": torch.tensor(ratios),
        "lrs": torch.tensor(lrs), "grid": torch.tensor(grid),
        **{f"concept.{n}": p.detach().cpu() for n, p in heads.named_parameters() if n != "elements"},
        **{f"standard.{n}": p.detach().cpu() for n, p in probes.named_parameters()}})
    spec = mtr["info"]["backbone"]
    meta = {"backbone": spec["name"], "arch": spec["arch"], "weights": spec["weights"], "layer": spec["layer"],
            "pooling": spec["pooling"], "dataset": mtr["info"].get("dataset"), "concept_type": args.concept_type,
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
