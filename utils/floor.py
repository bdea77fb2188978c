"""The random-concept floor beside an IIS (docs/validity.md).

The floor is the IIS the same features get, under the same training, with K random directions in place of the K
concepts; the *concept lift* is IIS - floor. A lift whose interval contains 0 says the concepts explain the
representation no better than random directions do, whatever the IIS itself is.

Training (:func:`train`): each floor draw d is one extra group of Prototype-style heads over fixed random directions
(:func:`random_directions`, seeded by the draw alone), trained in the trainer's process by :func:`utils.heads.fit`
with the split, batch order and head initialisation of the run's seed ``paired_seed(seeds, d)`` and scored against
that seed's standard probe. Its rows go into results.json with ``head: "floor"`` and ``draw: d``; the concept rows
are untouched (the floor heads are a separate module trained after them).

Scoring (:func:`score`): the floor rows are scored by the IIS rule (:mod:`utils.iis`) as if each draw were a seed;
both scores are bootstrapped on the same resamples of the same val samples, so the lift's interval is paired, and
the floor's draws are resampled too, so the interval also covers which random directions were drawn.
"""
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import fitcache, iis, stats, sweep, validate
from .errors import UserError
from .heads import SparseConceptHeads, fit

# iso: isotropic Gaussian in feature space (depends on nothing but D and the draw: the same floor for every concept
#      set of a representation); matched: Gaussian with the element embeddings' mean and covariance (keeps the
#      library's geometry, e.g. its shared direction, and drops which element is which).
KINDS = ("iso", "matched")
PROTOCOL_DRAWS = {"iis": 3, "reference": 0}   # the reference protocol reproduces the original: no extra heads
STREAM = 1729   # the floor's own seed stream, apart from the subset, concept and split streams


@dataclass(frozen=True)
class FloorConfig:
    """The trainer's floor flags: draws (None = the protocol's, :data:`PROTOCOL_DRAWS`) and the distribution."""
    floor_draws: int
    floor_kind: str


def resolve(cfg, protocol):
    """``cfg`` with its draw count filled from ``protocol`` and checked."""
    draws = PROTOCOL_DRAWS[protocol] if cfg.floor_draws is None else cfg.floor_draws
    if draws < 0:
        raise UserError(f"--floor_draws must be 0 (no floor) or a number of draws, got {draws}")
    if cfg.floor_kind not in KINDS:
        raise UserError(f"--floor_kind must be one of {', '.join(KINDS)}, got {cfg.floor_kind!r}")
    return replace(cfg, floor_draws=draws)


def key_of(cfg):
    """What the floor adds to a run's training key; None without a floor, so a floorless run keeps its key."""
    return None if cfg.floor_draws == 0 else {"draws": cfg.floor_draws, "kind": cfg.floor_kind, "stream": STREAM}


def paired_seed(seeds, draw):
    """The run seed whose split, batch order, initialisation and standard probe floor draw ``draw`` shares."""
    return seeds[draw % len(seeds)]


def random_directions(kind, draw, k, dim, elements=None):
    """(k, dim) float32 random directions of floor draw ``draw``: a function of (kind, draw, k, dim) and, for
    'matched', of the element embeddings (E, dim) whose mean and covariance they take."""
    return directions(kind, np.random.default_rng([STREAM, int(draw)]), k, dim, elements)


def directions(kind, rng, k, dim, elements=None):
    """(k, dim) float32 directions of ``kind`` drawn from the generator ``rng`` (the one place they are drawn:
    :func:`random_directions` for the trainer, bench/floor_common.py for the floor study)."""
    if kind == "iso":
        return rng.standard_normal((k, dim)).astype(np.float32)
    if kind == "matched":
        e = np.asarray(elements, dtype=np.float64)
        if e.ndim != 2 or len(e) < 2:
            raise UserError("the matched floor needs at least two element embeddings")
        mean = e.mean(0)
        # mean + (E - mean)^T z / sqrt(n - 1), z ~ N(0, I_n): exactly the empirical covariance, even when n < dim
        z = rng.standard_normal((k, len(e)))
        return (mean + z @ (e - mean) / np.sqrt(len(e) - 1)).astype(np.float32)
    raise UserError(f"unknown floor kind {kind!r} (one of {', '.join(KINDS)})")


def _num(v):
    return None if not np.isfinite(v) else float(v)


def train(cfg, fcfg, ratios, lrs, k, elements, n_classes, probe_data, splits, device, first_pred_row, cache=None):
    """Train the floor heads of a resolved sweep config ``cfg`` and floor config ``fcfg`` (draws > 0).

    ``probe_data`` = (x_train, y_train, x_val, y_val) as the standard probe trains on; ``splits`` the run's
    :class:`utils.heads.Split` per seed of ``cfg.seeds``; ``k`` the concepts per set; ``elements`` the element
    embeddings (for 'matched'). The floor depends on none of the concepts but their number, so with ``cache`` (a
    :class:`utils.fitcache.FitCache` of these features) every run of the same K and training settings shares one.
    Returns (results rows with ``pred_row`` from ``first_pred_row`` on, predictions (R, N_val), the directions
    (draws, k, dim))."""
    draws = range(fcfg.floor_draws)
    dim = probe_data[0].shape[1]
    vectors = np.stack([random_directions(fcfg.floor_kind, d, k, dim, elements) for d in draws])
    floor_splits = [splits[cfg.seeds.index(paired_seed(cfg.seeds, d))] for d in draws]
    key = dict(floor=key_of(fcfg), k=k, dim=dim, n_classes=n_classes, device=device.type,
               training=sweep.training_key(cfg), x_train=fitcache.placement(probe_data[0]),
               x_val=fitcache.placement(probe_data[2]),
               splits=[[fitcache.rows_digest(s.train), fitcache.rows_digest(s.dev), s.seed] for s in floor_splits],
               directions=validate.array_digest(vectors))
    hit = cache.load("floor", key) if cache is not None else None
    if hit is not None:
        rows, pred = hit[1]["runs"], hit[0]["pred"]
    else:
        rows, pred = _train(cfg, fcfg, ratios, lrs, vectors, n_classes, probe_data, floor_splits, device)
        if cache is not None:
            cache.save("floor", key, {"pred": pred}, {"runs": rows})
    return [dict(r, pred_row=first_pred_row + h) for h, r in enumerate(rows)], pred, vectors


def _train(cfg, fcfg, ratios, lrs, vectors, n_classes, probe_data, floor_splits, device):
    """(results rows without pred_row, predictions) of the floor heads over ``vectors``."""
    grid = [(d, paired_seed(cfg.seeds, d), r, lr) for d in range(fcfg.floor_draws) for r in ratios for lr in lrs]
    heads = SparseConceptHeads(torch.as_tensor(vectors), n_classes, [r for _, _, r, _ in grid],
                               seed=[s for _, s, _, _ in grid], keep_rule=cfg.keep_rule, init=cfg.init,
                               groups=[d for d, _, _, _ in grid]).to(device)
    data = (sweep.concept_scores(heads, probe_data[0], device), probe_data[1],
            sweep.concept_scores(heads, probe_data[2], device), probe_data[3])
    res = fit(heads.on_scores(), [lr for *_, lr in grid], *data, epochs=cfg.epochs, batch_size=cfg.batch_size,
              weight_decay=cfg.weight_decay, lr_decay=cfg.lr_decay, splits=floor_splits, precision=cfg.precision,
              desc="floor heads")
    runs = [dict(head="floor", draw=d, ratio=r, lr=lr, seed=s, index=h, n_active=heads.keep_list[h],
                 top1=_num(res["top1"][h]), top5=_num(res["top5"][h]), select_top1=_num(res["select_top1"][h]),
                 epoch=int(res["epoch"][h]), train_loss=_num(res["train_loss"][h]), val_loss=_num(res["val_loss"][h]),
                 diverged=int(res["diverged"][h]) or None)
            for h, (d, s, r, lr) in enumerate(grid)]
    return runs, res["pred"]


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------
def view(results):
    """The results with the floor rows as concept rows, each draw posing as a seed (with a copy of its paired seed's
    standard rows), so the IIS rule scores the floor unchanged; None when the results hold no floor rows."""
    runs = iis.runs_of(results)
    rows = [r for r in runs if r["head"] == "floor"]
    if not rows:
        return None
    out = []
    for d in sorted({r["draw"] for r in rows}):
        mine = [r for r in rows if r["draw"] == d]
        out += [dict(r, seed=d) for r in runs if r["head"] == "standard" and r["seed"] == mine[0]["seed"]]
        out += [dict(r, head="concept", seed=d) for r in mine]
    return dict(results, runs=out)


def draw_samples(fsamples, ratios, n_boot, boot_seed):
    """(n_boot,) bootstrap samples of the floor IIS that cover both the val sample and the choice of random draws:
    resample b recomputes every draw's IIS on val resample b (the same resamples as the run's, so they pair) and
    averages a resample, with replacement, of the draws (its own stream, fixed by ``boot_seed``)."""
    acc, chance = stats.bootstrap_accuracies(fsamples["correct"], fsamples["labels"], n_boot, boot_seed)
    per_draw = stats.curve_statistics(acc, fsamples["rows"], ratios, chance)["iis"]          # (n_boot, draws)
    pick = np.random.default_rng([STREAM, int(boot_seed)]).integers(0, per_draw.shape[1], per_draw.shape)
    return np.take_along_axis(per_draw, pick, 1).mean(1)


def score(results, predictions, scored, samples, metric="top1", n_boot=stats.N_BOOT, boot_seed=0,
          level=stats.LEVEL):
    """The ``floor`` entry of iis.json for a run scored as ``scored`` (with bootstrap ``samples`` from
    :func:`utils.iis.score_with_stats`, same ``n_boot`` and ``boot_seed``), or None when it has no floor rows.

    Holds the floor IIS (mean over draws) with its spread over draws, each draw's IIS, and the lift IIS - floor
    with its paired interval and p-value (:func:`utils.stats.compare` of the run's bootstrap samples and
    :func:`draw_samples`); ``note`` says why a part is missing."""
    v = view(results)
    if v is None:
        return None
    info = results.get("meta", {}).get("floor") or {}
    try:
        fs, fsamples = iis.score_with_stats(v, predictions, metric, n_boot, boot_seed, level)
    except UserError as e:      # e.g. every floor head of a ratio diverged: the run still scores, its floor does not
        return {"kind": info.get("kind"), "draws": info.get("draws"), "iis": None, "lift": None, "note": str(e)}
    out = {"kind": info.get("kind"), "draws": len(fs["seeds"]), "paired_seeds": info.get("paired_seeds"),
           "iis": fs["iis"], "iis_std": fs["iis_std"], "per_draw": [p["iis"] for p in fs["per_seed"]],
           "lift": scored["iis"] - fs["iis"], "lift_interval": None, "lift_p": None, "verdict": None,
           "note": fs.get("note")}
    a = (samples or {}).get("samples")
    if a is not None and (fsamples or {}).get("samples") is not None:
        b = draw_samples(fsamples, fs["ratios"], n_boot, boot_seed)
        lo, hi = stats.interval(b, level)
        c = stats.compare(a["iis"], b, out["lift"], len(samples["labels"]), level)
        out.update(interval=[float(lo), float(hi)], lift_interval=c["interval"], lift_p=c["p"],
                   verdict=c["verdict"], level=level, resamples=c["resamples"],
                   covers="val samples resampled (the same resamples for the run and its floor: paired) and the "
                          "floor's draws resampled; the run's heads fixed, its seeds as their mean")
        if out["draws"] == 1:
            out["note"] = "one floor draw: the interval does not cover the spread between draws (use --floor_draws 3)"
    return out


def lift_line(label, f):
    """One line on a run's concept lift, saying what it means."""
    if f.get("iis") is None:
        return f"concept lift: {label}: no floor ({f.get('note')})"
    spread = f" ± {f['iis_std']:.4f} over draws" if f.get("iis_std") is not None else ""
    head = (f"concept lift: {label}: IIS - floor = {f['lift']:+.4f} (floor {f['iis']:.4f}{spread}, "
            f"{f['draws']} {f['kind']} random-direction draw{'s' if f['draws'] != 1 else ''}")
    if f.get("lift_interval") is None:
        return head + "; no interval: " + (f.get("note") or "no bootstrap") + ")"
    lo, hi = f["lift_interval"]
    p_floor = 2.0 / (f["resamples"] + 1)
    p = f"<= {p_floor:.2g}" if f["lift_p"] <= p_floor * (1 + 1e-9) else f"= {f['lift_p']:.3g}"
    head += f"), {100 * f['level']:g} % paired interval [{lo:+.4f}, {hi:+.4f}], p {p}: "
    if f["verdict"] == ">":
        return head + "the concepts beat random directions"
    if f["verdict"] == "<":
        return head + "random directions score HIGHER than these concepts (docs/validity.md)"
    return head + "no detectable lift: these concepts do no better than random directions (docs/validity.md)"
