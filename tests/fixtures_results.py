"""Hand-built training results in the contract's schema (iis.results/2 + predictions.npz), written the way the
trainers will write them, so scoring can be tested without training anything."""
import json
import os

import numpy as np

GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)


def balanced_labels(n, n_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


def head(kind, correct, *, ratio=None, lr=0.01, seed=0, select_top1=None, diverged=None):
    """One head: its per-sample correctness and the fields the results row gets."""
    return {"head": kind, "ratio": ratio, "lr": lr, "seed": seed, "correct": np.asarray(correct, dtype=bool),
            "select_top1": select_top1, "diverged": diverged}


def planted_heads(labels, standard, curve, seeds=(0,), lrs=(0.01, 0.1), rng=None, worse_lr=0.9):
    """Heads whose per-sample correctness is Bernoulli(p): p = ``standard`` (%) for the probe, ``curve[i]`` (%) at
    ratio GRID[i]; the second lr is ``worse_lr`` times as accurate, so the first one is chosen."""
    rng = rng if rng is not None else np.random.default_rng(0)
    n = len(labels)
    out = []
    for seed in seeds:
        for j, lr in enumerate(lrs):
            f = 1.0 if j == 0 else worse_lr
            out.append(head("standard", rng.random(n) < f * standard / 100, lr=lr, seed=seed))
            out += [head("concept", rng.random(n) < f * p / 100, ratio=r, lr=lr, seed=seed)
                    for r, p in zip(GRID, curve)]
    return out


def random_heads(labels, n_classes, seeds=(0,), lrs=(0.01, 0.1), rng=None):
    """A chance-level run: every head predicts a uniformly random class."""
    rng = rng if rng is not None else np.random.default_rng(0)
    out = []
    for seed in seeds:
        for lr in lrs:
            for kind, ratio in [("standard", None)] + [("concept", r) for r in GRID]:
                pred = rng.integers(0, n_classes, size=len(labels))
                out.append(head(kind, pred == labels, ratio=ratio, lr=lr, seed=seed))
    return out


def write_run(folder, heads, labels, n_classes=10, val_samples="0123456789abcdef", schema=2, meta=None):
    """results.json (+ predictions.npz for schema 2) in ``folder``; wrong predictions name the next class."""
    os.makedirs(folder, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    seeds = sorted({h["seed"] for h in heads})
    m = {"backbone": "planted", "arch": "none", "weights": "none", "layer": os.path.basename(folder),
         "pooling": "avg", "dataset": "synthetic", "concept_type": "prototype", "classes": [str(c) for c in
         range(n_classes)], "n_concepts": 20, "n_train": 100, "n_val": n, "feature_dim": 8}
    if schema == 2:
        m.update(protocol="iis", select_on="val", seeds=seeds, val_samples=val_samples)
    m.update(meta or {})
    runs, preds = [], []
    for i, h in enumerate(heads):
        pred = np.where(h["correct"], labels, (labels + 1) % n_classes).astype(np.int16)
        top1 = 100.0 * float(np.mean(pred == labels))
        row = {"head": h["head"], "ratio": h["ratio"], "lr": h["lr"], "top1": top1, "top5": min(100.0, top1 + 5),
               "epoch": 3, "train_loss": 1.0, "val_loss": 1.0}
        if h["head"] == "concept":
            row["n_active"] = 5
        if schema == 2:
            row.update(seed=h["seed"], diverged=h["diverged"], pred_row=i,
                       select_top1=top1 if h["select_top1"] is None else h["select_top1"])
        runs.append(row)
        preds.append(pred)
    res = {"schema": f"iis.results/{schema}", "key": {"planted": folder}, "key_hash": "0" * 16, "meta": m,
           "sparsity_grid": list(GRID), "lr_grid": sorted({h["lr"] for h in heads}), "runs": runs}
    if schema == 2:
        res.update(seeds=seeds, predictions="predictions.npz")
        np.savez(os.path.join(folder, "predictions.npz"), pred=np.stack(preds), labels=labels)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(res, f)
    return folder


def flip_concept_hits(heads, fraction, rng):
    """The same heads with ``fraction`` of every concept head's correct predictions made wrong (the standard probe
    untouched): a run that keeps less of its accuracy under sparsity."""
    out = []
    for h in heads:
        c = h["correct"].copy()
        if h["head"] == "concept":
            hit = np.flatnonzero(c)
            c[rng.choice(hit, size=int(round(fraction * len(hit))), replace=False)] = False
        out.append(dict(h, correct=c))
    return out
