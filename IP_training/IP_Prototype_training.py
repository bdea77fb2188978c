r"""Train the standard linear probe and sparse visual-concept heads (Prototype, Cluster or End-to-end) over the
sparsity x lr grid.

    python -m IP_training.IP_Prototype_training \
        --train_features outputs/features/fashion_mnist/efficientnet_lite0/train \
        --val_features outputs/features/fashion_mnist/efficientnet_lite0/val \
        --concepts outputs/features/fashion_mnist/efficientnet_lite0/elements_segments \
        --concept_type prototype --out outputs/runs/fashion_mnist/efficientnet_lite0/prototype_segments

Concept types: prototype = element embeddings themselves; cluster = KMeans centres of them; end2end = a hard
Gumbel-softmax assignment of elements to concepts learnt together with each head.

Output in --out: results.json (schema in docs/files.md: one row per head with ratio, lr, top-1, top-5, the epoch kept and
its losses) and heads.pt (torch.load(..., weights_only=True): concepts, the element rows they came from, every head's
parameters). With --floor_draws N (default 3 under the iis protocol, 0 under reference) it also trains N groups of
heads on K random directions, rows ``head: "floor"`` in results.json, from which iis_computing.py reports the floor
and the concept lift (docs/validity.md). Features stay resident in memory (on the GPU if there is one); all heads of
a sweep train together.
"""
import argparse
import os

import numpy as np
import torch

from utils import cli, compat, fitcache, floor, sweep, validate
from utils.cli import flags
from utils.concepts import SELECTIONS, background_rows, cluster_centres, select_prototypes
from utils.device import resolve_device
from utils.errors import UserError
from utils.fileio import key_hash, read_json
from utils.heads import End2EndConceptHeads, SparseConceptHeads

CONCEPT_TYPES = ("prototype", "cluster", "end2end")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_io_args(p, "--concepts", "store entry of element embeddings (visual_element_emb_extractor)")
    g = p.add_argument_group("concepts")
    g.add_argument("--concept_type", default="prototype", choices=CONCEPT_TYPES, help="where concepts come from")
    g.add_argument("--n_concepts", type=int, default=200,
                   help="number of concepts (prototype: 0 = every element)")
    g.add_argument("--concept_selection", default="balanced", choices=SELECTIONS,
                   help="prototype: which element embeddings become concepts: balanced = evenly across classes "
                        "(default, so no class is missing from the vocabulary); first = the original code's first-N; "
                        "random. end2end: how its candidate pool and seeds are drawn")
    g.add_argument("--e2e_pool", type=int, default=2000,
                   help="end2end: candidate elements the assignment chooses from (memory grows with pool x concepts "
                        "x heads)")
    g.add_argument("--exclude_background", action="store_true",
                   help="leave out of the concept set the elements that are mostly background (uniform padding or one "
                        "constant region: utils/elements.is_background); part of the run's key")
    g.add_argument("--tau", type=float, default=0.1, help="end2end: Gumbel-softmax temperature")
    g.add_argument("--e2e_gain", type=float, default=5.0,
                   help="end2end: initial gain of the LayerNorm on the assignment logits (how sharp the initial "
                        "partition around the seed elements is; see utils/heads.py)")
    flags.add_training_args(p)
    flags.add_floor_args(p)
    return p


def check_compatible(train_meta, val_meta, concept_meta, dims, paths=("train", "val", "concepts")):
    sweep.backbone_meta(train_meta, paths[0])          # what results.json records of it, checked before training
    bb = [validate.meta_field(p, m, "key.backbone") for p, m in zip(paths, (train_meta, val_meta, concept_meta))]
    if not bb[0] == bb[1] == bb[2]:
        raise UserError("train, val and concept features come from different backbones/layers/preprocessing")
    if len(set(dims)) != 1:
        raise UserError(f"feature dimensions differ: train/val/concepts = {dims}")
    if train_meta["info"].get("classes") != val_meta["info"].get("classes"):
        raise UserError("train and val features have different class lists")


def element_index(concepts_meta):
    """The element library behind the concept embeddings: its parsed index.json with its folder as ``root``."""
    path = concepts_meta["info"].get("elements_index")
    if not path or not os.path.isfile(path):
        raise UserError(f"--exclude_background needs the element library the concepts were embedded from; "
                        f"{path or 'none is recorded'} is gone")
    index = read_json(path)
    if len(index["elements"]) != concepts_meta["arrays"]["features"][0][0]:
        raise UserError(f"{path} lists {len(index['elements'])} elements, the concept embeddings hold "
                        f"{concepts_meta['arrays']['features'][0][0]}: re-embed them")
    return dict(index, root=os.path.dirname(path))


def concept_set(args, emb, emb_labels, seed):
    """One seed's concepts: (vectors or candidate pool, element rows behind them, end2end seed rows or None)."""
    if args.concept_type == "prototype":
        rows = select_prototypes(emb_labels, args.n_concepts, args.concept_selection, seed)
        return emb[rows], rows, None
    if args.concept_type == "cluster":
        centres, rows = cluster_centres(emb, args.n_concepts, seed)
        return centres, rows, None
    rows = select_prototypes(emb_labels, args.e2e_pool, args.concept_selection, seed)
    if args.n_concepts > len(rows):
        raise UserError(f"{args.n_concepts} end2end concepts need at least as many candidate elements, "
                            f"have {len(rows)}")
    return emb[rows], rows, select_prototypes(emb_labels[rows], args.n_concepts, args.concept_selection, seed)


def make_heads(args, cfg, emb, emb_labels, n_classes, grid):
    """The sweep's concept heads (one per (seed, ratio, lr) of ``grid``, each seed its own concepts) and the element
    rows behind their concepts, (K,) for one seed or (G, K) for several."""
    sets = [concept_set(args, emb, emb_labels, s) for s in cfg.seeds]
    vectors = torch.as_tensor(np.stack([v for v, _, _ in sets]))
    rows = np.stack([r for _, r, _ in sets])
    common = dict(seed=[s for s, _, _ in grid], keep_rule=cfg.keep_rule, groups=sweep.groups_of(grid, cfg.seeds),
                  init=cfg.init)
    ratios = [r for _, r, _ in grid]
    if args.concept_type == "end2end":
        heads = End2EndConceptHeads(vectors, np.stack([e for _, _, e in sets]), n_classes, ratios, tau=args.tau,
                                    gain=args.e2e_gain, **common)
    else:
        heads = SparseConceptHeads(vectors, n_classes, ratios, **common)
    return heads, rows[0] if len(rows) == 1 else rows


def main(args):
    cfg = sweep.resolve_protocol(cli.config(sweep.SweepConfig, args))
    fcfg = floor.resolve(cli.config(floor.FloorConfig, args), cfg.protocol)
    ratios, lrs, grid = sweep.grid_of(cfg)
    if args.n_concepts < 0 or (args.concept_type != "prototype" and args.n_concepts < 1):
        raise UserError(f"--n_concepts must be positive for {args.concept_type} concepts")
    tr, mtr = sweep.load_split(args.train_features, args.verify)
    dim = tr["features"].shape[1]
    (va, mva), (co, mco) = (sweep.load_split(p, args.verify, dim=dim) for p in (args.val_features, args.concepts))
    xtr, ytr, xva, yva = tr["features"], tr["labels"], va["features"], va["labels"]
    emb, emb_labels = co["features"], co["labels"]
    check_compatible(mtr, mva, mco, (xtr.shape[1], xva.shape[1], emb.shape[1]),
                     (args.train_features, args.val_features, args.concepts))
    key = sweep.training_key(cfg, train=mtr["key_hash"], val=mva["key_hash"], concepts=mco["key_hash"],
                             concept_type=args.concept_type, n_concepts=args.n_concepts,
                             concept_selection=args.concept_selection)
    if args.concept_type == "end2end":
        key.update(e2e_pool=args.e2e_pool, tau=args.tau, e2e_gain=args.e2e_gain)
    if floor.key_of(fcfg) is not None:
        key.update(floor=floor.key_of(fcfg))
    emb, emb_labels, pool = np.asarray(emb), np.asarray(emb_labels), np.arange(len(emb))
    if args.exclude_background:   # the rows kept: the library's (its digest is in the concepts' key) and the rule's
        pool = np.flatnonzero(~background_rows(element_index(mco)))
        print(f"--exclude_background: {len(emb) - len(pool)} of {len(emb)} elements are mostly background, left out")
        emb, emb_labels = emb[pool], emb_labels[pool]
        key.update(exclude_background=True, kept_rows=key_hash({"rows": pool.tolist()}))
    if sweep.is_done(args.out, key):
        return
    device = resolve_device(args.device)
    torch.manual_seed(cfg.seeds[0])   # end2end's Gumbel noise
    classes = mtr["info"]["classes"]
    heads, rows = make_heads(args, cfg, emb, emb_labels, len(classes), grid)
    rows = pool[rows]   # rows of the element library, whatever was left out
    heads = heads.to(device)
    k = heads.weight.shape[1]
    print(f"{len(ytr)} train / {len(yva)} val samples, {xtr.shape[1]}-d features, {len(classes)} classes, "
          f"{k} {args.concept_type} concepts, {len(ratios)} ratios x {len(lrs)} lrs x {len(cfg.seeds)} seeds on "
          f"{device} ({cfg.protocol} protocol, epochs chosen on {cfg.select_on})")
    place = dict(placement=cfg.features_on, dtype=cfg.feature_dtype)
    probe_data = (sweep.features(xtr, device, **place), sweep.tensor(ytr, device),
                  sweep.features(xva, device, **place), sweep.tensor(yva, device))
    if args.concept_type == "end2end":   # learnt concepts: activations are recomputed at every step
        module, head_data = heads, probe_data
    else:                                # fixed concepts: normalised scores once, then only the heads train
        module = heads.on_scores()
        head_data = (sweep.concept_scores(heads, probe_data[0], device), probe_data[1],
                     sweep.concept_scores(heads, probe_data[2], device), probe_data[3])
    splits = sweep.make_splits(ytr, cfg.seeds, cfg.select_on, cfg.holdout_fraction)
    cache = fitcache.FitCache(args.train_features, dict(train=fitcache.entry_key(mtr), val=fitcache.entry_key(mva)))
    runs, probes, preds = sweep.train(cfg, module, grid, probe_data, head_data, len(classes), device, splits, cache)
    floor_info = None
    if fcfg.floor_draws:
        floor_runs, floor_preds, directions = floor.train(cfg, fcfg, ratios, lrs, k, np.asarray(emb), len(classes),
                                                          probe_data, splits, device, len(preds), cache)
        runs, preds = runs + floor_runs, np.concatenate([preds, floor_preds])
        floor_info = dict(floor.key_of(fcfg), paired_seeds=[floor.paired_seed(cfg.seeds, d)
                                                           for d in range(fcfg.floor_draws)])

    heads.eval()
    with torch.no_grad():
        # end2end: (H, K, D), each head's learnt concepts; else (K, D), or (G, K, D) with one set per seed
        concepts = heads.concept_matrix() if args.concept_type == "end2end" else heads.concept_matrix_by_group()
        provenance = {"concepts": concepts.cpu(),
                      "concept_rows": torch.as_tensor(rows)}
        if args.concept_type == "end2end":   # per head, the concept each pool element (concept_rows) went to
            provenance["assignment"] = heads.assignment().argmax(-1).cpu()
    if floor_info:
        provenance["floor_directions"] = torch.as_tensor(directions)
    meta = sweep.run_meta(cfg, mtr, mva, concept_type=args.concept_type,
                          elements=mco["info"].get("elements_index"), n_concepts=k, n_train=len(ytr), n_val=len(yva),
                          feature_dim=int(xtr.shape[1]), device=str(device), floor=floor_info, command=cli.command(),
                          inputs={"train": os.path.abspath(args.train_features),
                                  "val": os.path.abspath(args.val_features),
                                  "concepts": os.path.abspath(args.concepts)})
    sweep.save(args.out, key, meta, grid, runs, preds, yva, heads, probes, provenance)


if __name__ == "__main__":
    cli.run(main, get_args_parser(), dialect=compat.dialect(__file__))
