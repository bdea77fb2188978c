"""The planted-feature, mechanism and cost sections of bench/concept_floor.py (run through it: `python -m
bench.concept_floor --sections planted mechanism cost`)."""
import hashlib
import os
import time

import numpy as np

from bench.floor_common import centred, concept_entry, fmt_cmp, loop_seconds, short, table, train, whitened
from utils import fileio, floor, stats, store
from utils.iis import load_predictions

# ---------------------------------------------------------------------------------------------------------------------
# Planted features: the answer is known
# ---------------------------------------------------------------------------------------------------------------------
PLANTED = dict(n_train=2000, n_val=1000, dim=128, n_classes=10, n_true=40, per_class=6, copies=3, noise=2.5,
               offset=8.0, element_cosine=0.8)


def planted_data(rho, seed=0, p=PLANTED):
    """Features whose class information is carried by K_true concept directions (share 1 - rho) and by dense
    class directions orthogonal to them (share rho), plus isotropic noise and a shared offset along one direction
    with a per-sample magnitude (as post-ReLU features have: most of their energy on their mean).

    Class c is a sparse code over the concept directions (``per_class`` of them, overlapping across classes); its
    dense mean has the same norm. Everything random but rho is drawn from ``seed`` alone, in the same order, so the
    labels and noise are the same for every rho: runs on different rho pair on the same val samples.
    Returns (train x, train y, val x, val y, concept directions (K_true, D), shared direction (D,), class codes)."""
    rng = np.random.default_rng([seed, 11])
    d, t, c = p["dim"], p["n_true"], p["n_classes"]
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    concepts, dense = q[:, :t].T, q[:, t:].T
    codes = np.zeros((c, t))
    for k in range(c):
        codes[k, rng.choice(t, p["per_class"], replace=False)] = 1.0
    means = rng.standard_normal((c, d - t))
    means = np.sqrt(p["per_class"]) * means / np.linalg.norm(means, axis=1, keepdims=True) @ dense
    shared = np.ones(d) / np.sqrt(d)

    def split(n):
        y = rng.integers(0, c, n)
        a = codes[y] * (1 + 0.3 * rng.standard_normal((n, t))) + 0.3 * rng.standard_normal((n, t))
        xd = means[y] * (1 + 0.3 * rng.standard_normal((n, 1)))
        eps = p["noise"] * 3 / np.sqrt(d) * rng.standard_normal((n, d))
        off = p["offset"] * (1 + 0.2 * rng.standard_normal((n, 1))) * shared
        x = np.sqrt(1 - rho) * a @ concepts + np.sqrt(rho) * xd + eps + off
        return x.astype(np.float32), y
    return split(p["n_train"]) + split(p["n_val"]) + (concepts, shared, codes)


def planted_elements(concepts, shared, codes, kind, seed=0, p=PLANTED):
    """Element embeddings for the planted features: ``copies`` noisy copies of every concept direction (cosine about
    ``element_cosine`` to it), labelled by a class whose code uses it.

    kind: ideal = just that; offset = plus the features' shared direction, scaled so the elements' mean pairwise
    cosine is about the demo's 0.56 (as embeddings by the same backbone share its mean); background = offset plus
    as many background elements (the shared direction and noise, no concept), as half the demo's segments are."""
    rng = np.random.default_rng([seed, 12])
    t, d = concepts.shape
    n = t * p["copies"]
    base = np.repeat(concepts, p["copies"], 0)
    sigma = np.sqrt(1 / p["element_cosine"] ** 2 - 1) / np.sqrt(d)
    e = base + sigma * rng.standard_normal((n, d))
    users = [np.flatnonzero(codes[:, k]) for k in range(t)]
    lab = np.array([rng.choice(u) if len(u) else rng.integers(0, len(codes)) for u in users])
    lab = np.repeat(lab, p["copies"])
    if kind == "ideal":
        return e, lab
    # cos(a + o s, b + o s) = o^2 / (o^2 + |a|^2) for a, b, s orthogonal-ish with |a| = |b|: o^2 = c |a|^2 / (1 - c)
    o = np.sqrt(0.56 / 0.44 * np.mean(np.sum(e ** 2, 1)))
    e = e + o * shared
    if kind == "offset":
        return e, lab
    if kind == "background":
        bg = o * (1 + 0.2 * rng.standard_normal((n, 1))) * shared + sigma * rng.standard_normal((n, d))
        return np.concatenate([e, bg]), np.concatenate([lab, rng.integers(0, len(codes), n)])
    raise ValueError(kind)


PLANTED_ELEMENTS = (("ideal", "noisy copies of the concept directions", None),
                    ("ideal", "ideal, whitened", whitened),
                    ("background", "+ shared direction + as many background elements", None),
                    ("background", "background, centred", centred),
                    ("background", "background, whitened", whitened))


def section_planted(demo, sc, args):
    like = {"key": {"backbone": {"arch": "planted", "params": PLANTED}},
            "info": {"classes": [f"c{i}" for i in range(PLANTED["n_classes"])]}}
    info = {**like["info"], "backbone": dict(name="planted", arch="planted", weights="none", layer="x",
                                             pooling="none")}
    runs = {}
    for rho in args.rhos:
        x, y, xv, yv, concepts, shared, codes = planted_data(rho)
        feats = os.path.join(args.work, "planted", f"rho{rho:g}_{short(PLANTED)}")
        for name, (f, lab) in (("train", (x, y)), ("val", (xv, yv))):
            key = {"backbone": like["key"]["backbone"], "data": {"split": name, "rho": rho, "seed": 0}}
            if not store.is_current(os.path.join(feats, name), key):
                store.write(os.path.join(feats, name), {"features": f, "labels": lab, "indices": np.arange(len(lab))},
                            key, info)
        work = os.path.join(feats, "concepts")
        k = PLANTED["n_true"] * PLANTED["copies"]   # every ideal element is a concept; the floor has as many

        def run(name, vectors, labels, seeds=(0, 1, 2), **key):
            entry = concept_entry(work, name, vectors, labels, {"rho": rho, **key}, like)
            return train(feats, entry, "prototype", seeds, k)
        pool = floor.directions("iso", np.random.default_rng([0, k, 7]), args.pool * k, x.shape[1])
        runs[rho, "floor"] = [run("floor-iso", pool, np.arange(len(pool)) % PLANTED["n_classes"],
                                  seeds=tuple(range(args.draws)), pool=args.pool)]
        for i, (kind, _, fix) in enumerate(PLANTED_ELEMENTS):
            e, lab = planted_elements(concepts, shared, codes, kind)
            e = fix(e) if fix else e
            runs[rho, i] = [run(f"planted-{kind}{'-' + fix.__name__ if fix else ''}", e, lab)]
    rows, ordering = [], []
    for i, what in [(None, "iso floor")] + [(j, w) for j, (_, w, _) in enumerate(PLANTED_ELEMENTS)]:
        iis, lift = [], []
        for rho in args.rhos:
            r = sc.row(f"rho = {rho:g}: {what}", runs[rho, "floor" if i is None else i],
                       None if i is None else runs[rho, "floor"])
            r.update(rho=rho, variant=what)
            rows.append(r)
            iis.append(r["iis"])
            lift.append(r.get("lift", {}).get("difference"))
        lo, hi = args.rhos[0], args.rhos[-1]
        ends = sc.row("", runs[lo, "floor" if i is None else i], None, runs[hi, "floor" if i is None else i])
        ordering.append((what, iis, lift, ends["vs_base"]))
    text = table("Planted features: true concepts against the floor as the dense share rho rises", rows,
                 f"{PLANTED}; K = {PLANTED['n_true'] * PLANTED['copies']} (every ideal element; the background "
                 f"variant's balanced selection takes K of its 2K); lift over the iso floor at the same rho (paired).")
    lines = ["| elements | IIS over rho = " + " / ".join(f"{r:g}" for r in args.rhos) + " | falls with rho | "
             f"lift over rho | lift falls | IIS(rho={lo:g}) - IIS(rho={hi:g}) [95 % paired] |",
             "|---|---|---|---|---|---|"]
    for what, iis, lift, c in ordering:
        mono = all(a > b for a, b in zip(iis, iis[1:]))
        lmono = None if lift[0] is None else all(a > b for a, b in zip(lift, lift[1:]))
        lines.append(f"| {what} | {' / '.join(f'{v:.3f}' for v in iis)} | {'yes' if mono else 'NO'} | "
                     + ("" if lift[0] is None else " / ".join(f"{v:+.3f}" for v in lift)) + " | "
                     + ("" if lmono is None else ("yes" if lmono else "NO")) + f" | {fmt_cmp(c)} |")
    summary = "### Planted ordering\n\n" + "\n".join(lines) + "\n"
    print(summary)
    return text + "\n" + summary, rows


# ---------------------------------------------------------------------------------------------------------------------
# Mechanism: the trainer's heads on other normalisations of the same concept scores (library level)
# ---------------------------------------------------------------------------------------------------------------------
def concepts_of(run):
    """(G, K, D) concept vectors a trainer run used (heads.pt), one set per seed."""
    import torch
    c = torch.load(os.path.join(run, "heads.pt"), weights_only=True)["concepts"]
    return c if c.ndim == 3 else c.unsqueeze(0)


def heads_on(norm, concepts, seeds, xtr, ytr, xva, yva, epochs=30, lrs=(1e-3, 1e-2)):
    """Train the sweep's heads (utils.heads.fit, the iis protocol's batch, lrs, dev split and initialisation) on
    ``norm`` of the concept scores x . c (c unit): 'layernorm' = the trainer's per-sample LayerNorm over the K
    concepts; 'standardise' = each concept standardised by its train mean and std (no per-sample normalisation).
    Group g uses concepts[g] and seed seeds[g]. Returns {(group, ratio): (select_top1, val predictions)} of the lr
    the IIS takes (best dev top-1, ties to the lower lr)."""
    import torch
    import torch.nn.functional as F

    from utils.heads import SPARSITY_GRID, SparseConceptHeads, fit
    from utils.sweep import make_splits
    c = torch.as_tensor(concepts, dtype=torch.float32)
    heads_grid = [(g, r, lr) for g in range(len(c)) for r in SPARSITY_GRID for lr in lrs]
    heads = SparseConceptHeads(c, int(ytr.max()) + 1, [r for _, r, _ in heads_grid],
                               seed=[seeds[g] for g, _, _ in heads_grid], groups=[g for g, _, _ in heads_grid])
    unit = heads.concepts
    s_tr = torch.einsum("nd,gkd->gnk", torch.as_tensor(xtr, dtype=torch.float32), unit)
    s_va = torch.einsum("nd,gkd->gnk", torch.as_tensor(xva, dtype=torch.float32), unit)
    if norm == "layernorm":
        z_tr, z_va = F.layer_norm(s_tr, s_tr.shape[-1:]), F.layer_norm(s_va, s_va.shape[-1:])
    else:
        m, sd = s_tr.mean(1, keepdim=True), s_tr.std(1, keepdim=True) + 1e-6
        z_tr, z_va = (s_tr - m) / sd, (s_va - m) / sd
    splits = make_splits(ytr, list(seeds), "holdout", 0.1)
    res = fit(heads.on_scores(), [lr for _, _, lr in heads_grid], z_tr, torch.as_tensor(ytr), z_va,
              torch.as_tensor(yva), epochs=epochs, batch_size=256, splits=splits, desc=f"heads on {norm}")
    out = {}
    for h, (g, r, lr) in enumerate(heads_grid):
        cand = (res["select_top1"][h], -lr, res["pred"][h])
        if (g, r) not in out or cand[:2] > out[g, r][:2]:
            out[g, r] = cand
    return {k: (v[0], v[2]) for k, v in out.items()}


def cached_heads_on(work, norm, concepts, seeds, xtr, ytr, xva, yva):
    """:func:`heads_on`, kept in ``work`` as an npz keyed by every input's content, so a rescoring invocation does
    not train again."""
    from utils.heads import SPARSITY_GRID
    h = hashlib.sha256()
    for a in (np.asarray(concepts, np.float32), np.asarray(seeds), xtr, ytr, xva, yva):
        h.update(np.ascontiguousarray(a).tobytes())
    path = os.path.join(work, "mechanism", f"{norm}_{h.hexdigest()[:12]}.npz")
    groups, ratios = range(len(concepts)), list(SPARSITY_GRID)
    if os.path.exists(path):
        with np.load(path) as z:
            return {(g, r): (float(z["select"][g, i]), z["pred"][g, i]) for g in groups for i, r in enumerate(ratios)}
    chosen = heads_on(norm, concepts, seeds, xtr, ytr, xva, yva)
    sel = np.array([[chosen[g, r][0] for r in ratios] for g in groups])
    pred = np.stack([np.stack([np.asarray(chosen[g, r][1]) for r in ratios]) for g in groups])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, select=sel, pred=pred)
    os.replace(tmp, path)
    return chosen


def mechanism_row(sc, name, base_run, chosen, groups, floor=None, base=None):
    """A table row (as Scorer.row) for heads trained by :func:`heads_on`: each group's curve over the standard
    probe the trainer chose for its seed in ``base_run`` (the same features and seed); samples on the shared
    resamples, so it pairs with every trainer run."""
    from utils.heads import SPARSITY_GRID
    from utils.iis import runs_of, select
    res = fileio.read_json(os.path.join(base_run, "results.json"))
    pred, labels = load_predictions(res, base_run)
    std_rows = {seed: c["standard"]["pred_row"] for seed, c in select(runs_of(res)).items()}
    correct, rows = [], []
    for g, seed in groups:
        rows.append([len(correct)] + [len(correct) + 1 + i for i in range(len(SPARSITY_GRID))])
        correct.append(pred[std_rows[seed]] == labels)
        correct += [chosen[g, r][1] == labels for r in SPARSITY_GRID]
    correct, rows = np.array(correct), np.array(rows)
    st, samples = stats.run_statistics(correct, rows, list(SPARSITY_GRID), labels, sc.n_boot, sc.seed)
    r = {"name": name, "iis": st["iis"], "interval": st["iis_interval"], "standard": st["standard_accuracy"],
         "accuracies": (100 * correct.mean(1)[rows[:, 1:]].mean(0)).tolist(), "n_val": st["n_val"],
         "_samples": samples["iis"]}
    for label, other in (("lift", floor), ("vs_base", base)):
        if other is not None:
            r[label] = stats.compare(samples["iis"], other["_samples"], r["iis"] - other["iis"], r["n_val"])
            if label == "lift":
                r["floor"], r["floor_spread"] = other["iis"], None
    return r


def section_mechanism(demo, sc):
    """LayerNorm over concepts vs per-concept standardisation, for the real library and the iso floor, on the same
    heads, seeds and dev splits as the trainer."""
    va, _ = store.read(os.path.join(demo.features, "val"))
    tr, _ = store.read(os.path.join(demo.features, "train"))
    xtr, ytr = np.asarray(tr["features"]), np.asarray(tr["labels"])
    xva, yva = np.asarray(va["features"]), np.asarray(va["labels"])
    real = demo.real()
    floors = demo.floor("iso")
    concepts = np.concatenate([concepts_of(real).numpy()] + [concepts_of(f).numpy() for f in floors])
    seeds = [0, 1, 2] + list(range(demo.args.draws))
    n_real = len(concepts) - demo.args.draws
    rows = []
    for norm in ("layernorm", "standardise"):
        chosen = cached_heads_on(demo.work, norm, concepts, seeds, xtr, ytr, xva, yva)
        fl = mechanism_row(sc, f"iso floor, {norm}", real, chosen,
                           [(n_real + d, d) for d in range(demo.args.draws)], base=rows[0] if rows else None)
        rl = mechanism_row(sc, f"real library, {norm}", real, chosen, [(g, g) for g in range(n_real)], fl,
                           rows[1] if rows else None)
        rows += [fl, rl]
    for r in rows:
        r.pop("_samples")
    note = ("utils.heads.fit on precomputed scores x . c (the trainer's heads, batch 256, lrs 1e-3 1e-2, dev split, "
            "initialisation), the standard probe of the trainer's run of the same seed; 'layernorm' reproduces the "
            "trainer (compare with the tables above); 'vs base' (standardise rows) = standardise minus layernorm.")
    return table("Mechanism: LayerNorm over concepts vs per-concept standardisation", rows, note), rows


# ---------------------------------------------------------------------------------------------------------------------
# Cost of the floor, and the figure
# ---------------------------------------------------------------------------------------------------------------------
def section_cost(demo, sc):
    """Trainer time with one seed against one seed plus the 3 groups of concept heads a 3-draw floor would add
    (measured as --seeds 0 1 2 3, whose extra groups also train their own standard probes: an upper bound),
    alternated twice in fresh folders; the tqdm times split standard probe and concept heads."""
    import shutil
    entry = demo.entry("real", demo.emb, demo.labels)
    saved = os.path.join(os.path.dirname(entry), "timing.json")   # timed once: a rescoring run reuses it
    rows = [tuple(r) for r in fileio.read_json(saved)] if os.path.exists(saved) else []
    for rep in range(0 if rows else demo.args.timing_repeats):
        for seeds in ((0,), (0, 1, 2, 3)):
            out = os.path.join(os.path.dirname(entry), f"prototype_k{demo.args.n_concepts}_s"
                               f"{'-'.join(map(str, seeds))}_timing{rep}")
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            train(demo.features, entry, "prototype", seeds, demo.args.n_concepts, tag=f"_timing{rep}")
            wall = time.perf_counter() - t
            rows.append((rep, len(seeds), wall, loop_seconds(train.stderr, "standard probe"),
                         loop_seconds(train.stderr, "concept heads")))
            shutil.rmtree(out, ignore_errors=True)
    if not os.path.exists(saved):
        fileio.atomic_write_json(saved, [list(r) for r in rows])
    lines = ["### Cost of a 3-draw floor (trainer wall time, demo features, Prototype)", "",
             "| repeat | groups | wall s | standard probe s | concept heads s |", "|---|---|---|---|---|"]
    lines += [f"| {r} | {g} | {w:.0f} | {p:.0f} | {h:.0f} |" for r, g, w, p, h in rows]
    one = [r for r in rows if r[1] == 1]
    four = [r for r in rows if r[1] == 4]
    wall1, wall4 = np.mean([r[2] for r in one]), np.mean([r[2] for r in four])
    heads1, heads4 = np.mean([r[4] for r in one]), np.mean([r[4] for r in four])
    est = (wall1 + heads4 - heads1) / wall1
    lines += ["", f"One seed + 3 floor groups: x{wall4 / wall1:.2f} wall time with their probes (upper bound); "
              f"x{est:.2f} counting only the 3 extra groups of concept heads (the design trains no extra probe). "
              f"Timed on a shared, loaded machine: ratios within one invocation only."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    return text, rows
