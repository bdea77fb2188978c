r"""Train sparse heads on text concepts (Label-free-CBM style) over the sparsity x lr grid, plus the standard probe.

    python -m IP_training.IP_Text_training \
        --train_features outputs/features/fashion_mnist/efficientnet_lite0/train \
        --val_features outputs/features/fashion_mnist/efficientnet_lite0/val \
        --clip outputs/features/fashion_mnist/clip --out outputs/runs/fashion_mnist/efficientnet_lite0/text

Steps: CLIP activations = CLIP image . text features; concepts whose mean top-5 activation on train images is below
--clip_cutoff are dropped (CLIP does not see them); a bias-free projection W from backbone features to the remaining
concepts is learnt by maximising the cos^3 similarity with the CLIP activations, early-stopped on val; concepts
whose val similarity is below --interpretability_cutoff are dropped (the backbone cannot express them); the
activations x . W^T are standardised with train statistics; then a linear head per sparsity ratio x lr on each
sample's top-k activations by absolute value. Output: results.json (same schema as the visual path, meta adds the
kept and dropped concepts) and heads.pt (projection, standardisation, kept concept names' order, heads).
"""
import argparse
import os

import numpy as np
import torch

from utils import cli, compat, fitcache, store, sweep, validate
from utils.cli import flags
from utils.device import resolve_device
from utils.errors import UserError
from utils.heads import MaskedLinearHeads
from utils.masks import with_ranks
from utils.text import Standardiser, clip_activations, fit_projection, top5_mean


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_io_args(p, "--clip", "folder made by textual_emb_extractor (text/, train/, val/)")
    g = p.add_argument_group("concept filtering and projection")
    g.add_argument("--clip_cutoff", type=float, default=0.25,
                   help="drop concepts whose mean top-5 CLIP activation over train images is below this "
                        "(0.25 suits ViT-B/16 cosine similarities)")
    g.add_argument("--interpretability_cutoff", type=float, default=0.45,
                   help="drop concepts whose val cos^3 similarity after projection is below this")
    g.add_argument("--proj_lr", type=float, default=1e-3, help="projection learning rate (Adam)")
    g.add_argument("--proj_batch_size", type=int, default=2048, help="projection batch size")
    g.add_argument("--proj_epochs", type=int, default=200, help="projection epochs at most")
    g.add_argument("--proj_patience", type=int, default=10, help="stop after this many epochs without val gain")
    flags.add_training_args(p)
    return p


def load_aligned(backbone_path, clip_path, verify=None):
    backbone, meta = sweep.load_split(backbone_path, verify)
    x, y, bb_idx = backbone["features"], backbone["labels"], backbone.get("indices")
    arrays, cmeta = sweep.load_split(clip_path, verify)
    if len(arrays["features"]) != len(x) or (bb_idx is not None and not np.array_equal(arrays["indices"], bb_idx)) \
            or not np.array_equal(arrays["labels"], y):
        raise UserError(f"{clip_path} and {backbone_path} hold different images; extract both with the same "
                            f"dataset, split, subset size and seed")
    return x, y, meta, np.asarray(arrays["features"]), cmeta


def main(args):
    cfg = sweep.resolve_protocol(cli.config(sweep.SweepConfig, args))
    ratios, lrs, grid = sweep.grid_of(cfg)
    xtr, ytr, mtr, ctr, cmtr = load_aligned(args.train_features, os.path.join(args.clip, "train"), args.verify)
    xva, yva, mva, cva, cmva = load_aligned(args.val_features, os.path.join(args.clip, "val"), args.verify)
    text, tmeta = store.read(os.path.join(args.clip, "text"), verify=args.verify)
    validate.check_finite(os.path.join(args.clip, "text"), "features", text["features"])
    concepts = validate.meta_field(os.path.join(args.clip, "text"), tmeta, "info.concepts", list)
    sweep.backbone_meta(mtr, args.train_features)      # what results.json records of it, checked before training
    if validate.meta_field(args.train_features, mtr, "key.backbone") != \
            validate.meta_field(args.val_features, mva, "key.backbone"):
        raise UserError("train and val features come from different backbones/layers/preprocessing")
    key = sweep.training_key(cfg, train=mtr["key_hash"], val=mva["key_hash"], text=tmeta["key_hash"],
                             clip_train=cmtr["key_hash"], clip_val=cmva["key_hash"], clip_cutoff=args.clip_cutoff,
                             interpretability_cutoff=args.interpretability_cutoff, proj_lr=args.proj_lr,
                             proj_batch_size=args.proj_batch_size, proj_epochs=args.proj_epochs,
                             proj_patience=args.proj_patience, concept_type="text")
    if sweep.is_done(args.out, key):
        return
    device = resolve_device(args.device)
    torch.manual_seed(cfg.seeds[0])
    classes = mtr["info"]["classes"]

    a_tr, a_va = clip_activations(ctr, text["features"]), clip_activations(cva, text["features"])
    top5 = top5_mean(a_tr)
    seen = np.flatnonzero(top5 >= args.clip_cutoff)
    if len(seen) == 0:
        raise UserError(f"no concept passes --clip_cutoff {args.clip_cutoff}: the highest mean top-5 CLIP "
                            f"activation is {top5.max():.3f}")
    x_tr, x_va = sweep.tensor(xtr, device).float(), sweep.tensor(xva, device).float()
    w, sim = fit_projection(x_tr, sweep.tensor(a_tr[:, seen], device), x_va, sweep.tensor(a_va[:, seen], device),
                            args.proj_lr, args.proj_batch_size, args.proj_epochs, args.proj_patience, cfg.seeds[0])
    fits = sim >= args.interpretability_cutoff
    if not fits.any():
        raise UserError(f"no concept passes --interpretability_cutoff {args.interpretability_cutoff}: the best "
                            f"val similarity is {sim.max():.3f}")
    kept, w = seen[fits], w[torch.as_tensor(fits, device=device)]
    standardise = Standardiser(x_tr @ w.T)
    z_tr, z_va = standardise(x_tr @ w.T), standardise(x_va @ w.T)
    dropped_clip = [concepts[i] for i in np.flatnonzero(top5 < args.clip_cutoff)]
    dropped_fit = [concepts[i] for i in seen[~fits]]
    print(f"{len(concepts)} concepts: {len(dropped_clip)} below the CLIP cutoff, {len(dropped_fit)} below the "
          f"interpretability cutoff, {len(kept)} kept; {len(ratios)} ratios x {len(lrs)} lrs x {len(cfg.seeds)} seeds "
          f"on {device} ({cfg.protocol} protocol, epochs chosen on {cfg.select_on})")

    y_tr, y_va = sweep.tensor(ytr, device), sweep.tensor(yva, device)
    # the activations are fixed from here on, so each sample's concept ranks (its top-k masks) are computed once;
    # seeds change the heads' initialisation and batch order (the projection is fitted once, with the first seed)
    heads = MaskedLinearHeads(len(kept), len(classes), [r for _, r, _ in grid], [s for s, _, _ in grid], ranked=True,
                              keep_rule=cfg.keep_rule, init=cfg.init,
                              groups=sweep.groups_of(grid, cfg.seeds)).to(device)
    splits = sweep.make_splits(ytr, cfg.seeds, cfg.select_on, cfg.holdout_fraction)
    cache = fitcache.FitCache(args.train_features, dict(train=fitcache.entry_key(mtr), val=fitcache.entry_key(mva)))
    runs, probes, preds = sweep.train(cfg, heads, grid, (x_tr, y_tr, x_va, y_va),
                                      (with_ranks(z_tr), y_tr, with_ranks(z_va), y_va), len(classes), device, splits,
                                      cache)
    meta = sweep.run_meta(cfg, mtr, mva, concept_type="text", n_concepts=len(kept), n_train=len(ytr),
                          n_val=len(yva), feature_dim=int(xtr.shape[1]), device=str(device), command=cli.command(),
                          concepts=[concepts[i] for i in kept], concept_val_similarity=[float(s) for s in sim[fits]],
                          dropped_clip_cutoff=dropped_clip, dropped_interpretability_cutoff=dropped_fit,
                          clip=tmeta["key"].get("clip"), inputs={"train": os.path.abspath(args.train_features),
                                                             "val": os.path.abspath(args.val_features),
                                                             "clip": os.path.abspath(args.clip)})
    sweep.save(args.out, key, meta, grid, runs, preds, yva, heads, probes,
               {"projection": w.cpu(), "concept_index": torch.as_tensor(kept), "standardise_mean":
                standardise.mean.cpu(), "standardise_std": standardise.std.cpu()})


if __name__ == "__main__":
    cli.run(main, get_args_parser(), dialect=compat.dialect(__file__))
