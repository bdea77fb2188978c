"""The Inherent Interpretability Score: area under (accuracy at sparsity s / standard accuracy) over s.

Scoring rule (results schema ``iis.results/2``; schema 1 reads as one seed, 0, selected on val, nothing diverged,
no predictions): for each seed and each sparsity ratio, the non-diverged concept head with the highest
``select_top1`` (ties: the lower lr) supplies that ratio's accuracy; the standard accuracy is the best non-diverged
standard probe of that seed, chosen the same way. The IIS of each seed is the trapezoid area of its normalised
curve; the headline IIS is their mean. A ratio, or the standard probe, whose every head diverged has no accuracy and
is refused. With per-sample predictions, :func:`score_with_stats` adds the intervals of :mod:`utils.stats`.
"""
import os
import zipfile

import numpy as np

from . import stats
from .errors import UserError
from .results import SCORED_SCHEMA

SCHEMA_2 = "iis.results/2"


def iis(ratios, accuracies, standard_accuracy):
    """Trapezoid-rule area under ``accuracies / standard_accuracy`` over ``ratios``.

    >>> iis([0.0, 0.5, 1.0], [80, 60, 40], 80)   # 0.5 * (1 + .75) / 2 + 0.5 * (.75 + .5) / 2
    0.75
    """
    r = np.asarray(ratios, dtype=float)
    a = np.asarray(accuracies, dtype=float)
    if r.ndim != 1 or r.shape != a.shape:
        raise UserError("ratios and accuracies must be two lists of the same length")
    if len(np.unique(r)) < 2:
        raise UserError(f"IIS needs at least two distinct sparsity ratios, got {sorted(set(r.tolist()))}")
    if not standard_accuracy > 0:
        raise UserError(f"standard accuracy must be positive, got {standard_accuracy}")
    order = np.argsort(r)
    y = a[order] / standard_accuracy
    return float(np.sum((r[order][1:] - r[order][:-1]) * (y[1:] + y[:-1]) / 2.0))


def runs_of(results):
    """The results' runs with schema-2 defaults filled in for schema-1 rows (seed 0, chosen on their own top-1,
    never diverged), so one rule scores both."""
    out = []
    for r in results["runs"]:
        r = dict(r)
        r.setdefault("seed", 0)
        r.setdefault("diverged", None)
        if r.get("select_top1") is None:
            r["select_top1"] = r["top1"]
        out.append(r)
    return out


def pick(rows, what, seed):
    """The row that scores among ``rows`` (one seed, one ratio or the standard probe)."""
    ok = [r for r in rows if r["diverged"] is None or r["diverged"] is False]   # 0 may be a (0-based) epoch
    if not ok:
        how = ", ".join(f"lr {r['lr']:g} at epoch {r['diverged']}" for r in rows)
        raise UserError(f"every head of {what} (seed {seed}) diverged ({how}): it has no accuracy to score; "
                        f"retrain with smaller learning rates")
    # highest select_top1, then the lower lr: max() over (select_top1, -lr) keeps the first of exact duplicates
    return max(ok, key=lambda r: (r["select_top1"], -(r["lr"] or 0.0)))   # a converged probe has no lr


def select(runs):
    """Per seed, the rows that score: ``{seed: {"standard": row, "ratios": {ratio: row}}}``; ``runs`` as from
    :func:`runs_of`. Every seed must cover the same ratios."""
    seeds = sorted({r["seed"] for r in runs})
    ratios = sorted({r["ratio"] for r in runs if r["head"] == "concept"})
    if not any(r["head"] == "standard" for r in runs):
        raise UserError("the results hold no standard linear probe run")
    chosen = {}
    for seed in seeds:
        mine = [r for r in runs if r["seed"] == seed]
        std = [r for r in mine if r["head"] == "standard"]
        if not std:
            raise UserError(f"seed {seed} has concept heads but no standard linear probe")
        per_ratio = {}
        for s in ratios:
            rows = [r for r in mine if r["head"] == "concept" and r["ratio"] == s]
            if not rows:
                raise UserError(f"seed {seed} has no concept head at sparsity {s:g} (other seeds do)")
            per_ratio[s] = pick(rows, f"sparsity {s:g}", seed)
        chosen[seed] = {"standard": pick(std, "the standard probe", seed), "ratios": per_ratio}
    return chosen


def score(results, metric="top1"):
    """IIS of a results dict (schema 1 or 2): the mean over seeds, with each seed's curve and the heads behind it.

    ``accuracies``/``standard_accuracy`` are means over seeds and ``normalised`` the mean of the seeds' normalised
    curves, whose area is therefore exactly ``iis``.
    """
    runs = runs_of(results)
    chosen = select(runs)
    per_seed = []
    for seed, c in chosen.items():
        ratios = sorted(c["ratios"])
        std = c["standard"][metric]
        accs = [c["ratios"][s][metric] for s in ratios]
        if not all(np.isfinite([std] + accs)):
            raise UserError(f"seed {seed}: a chosen head has a non-finite {metric}; the results file is damaged")
        per_seed.append({"seed": seed, "iis": iis(ratios, accs, std), "standard_accuracy": std, "accuracies": accs,
                         "normalised": [a / std for a in accs], "standard_lr": c["standard"]["lr"],
                         "lrs": [c["ratios"][s]["lr"] for s in ratios],
                         "pred_rows": [c["standard"].get("pred_row")] + [c["ratios"][s].get("pred_row")
                                                                         for s in ratios]})
    mean, std_over_seeds = stats.seed_spread([p["iis"] for p in per_seed])
    return {"iis": mean, "iis_std": std_over_seeds, "seeds": [p["seed"] for p in per_seed],
            "standard_accuracy": float(np.mean([p["standard_accuracy"] for p in per_seed])), "ratios": ratios,
            "accuracies": np.mean([p["accuracies"] for p in per_seed], 0).tolist(),
            "normalised": np.mean([p["normalised"] for p in per_seed], 0).tolist(), "metric": metric,
            "diverged_heads": sum(r["diverged"] is not None and r["diverged"] is not False for r in runs),
            "per_seed": per_seed}


# ---------------------------------------------------------------------------------------------------------------------
# Per-sample predictions and intervals
# ---------------------------------------------------------------------------------------------------------------------
def load_predictions(results, folder):
    """``(pred (R, N), labels (N,))`` from the predictions file a results dict names, or None when it names none
    (schema 1). Refuses a file that is missing, unreadable or disagrees with the results' accuracies."""
    name = results.get("predictions")
    if not name:
        return None
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: results.json names it for its per-sample predictions")
    try:
        with np.load(path, allow_pickle=False) as z:
            pred, labels = z["pred"], z["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable predictions file with 'pred' and 'labels' ({e})") from None
    if pred.ndim != 2 or labels.ndim != 1 or pred.shape[1] != len(labels) or len(labels) == 0:
        raise UserError(f"{path}: pred {pred.shape} does not match labels {labels.shape} (want (R, N) and (N,))")
    if labels.min() < 0:
        raise UserError(f"{path}: negative labels")
    n_val = results.get("meta", {}).get("n_val")
    if n_val is not None and n_val != len(labels):
        raise UserError(f"{path} holds {len(labels)} val samples, results.json says n_val = {n_val}")
    # each head's stored top-1 must be what its predictions give, or the interval would describe other heads
    hits = None
    for i, r in enumerate(results["runs"]):
        row = r.get("pred_row")
        if row is None:
            raise UserError(f"{path}: run {i} ({r['head']}, ratio {r.get('ratio')}, lr {r.get('lr')}) has no pred_row")
        if not 0 <= row < len(pred):
            raise UserError(f"{path}: run {i} points at prediction row {row}, the file has {len(pred)}")
        if r["top1"] is None:   # a head that diverged before its first epoch ended: nothing was kept
            continue
        if hits is None:
            hits = (pred == labels[None, :]).sum(1)
        top1 = 100.0 * hits[row] / len(labels)
        if abs(top1 - r["top1"]) > 1e-6:
            raise UserError(f"{path}: row {row} gives top-1 {top1:.4f} % but results.json records {r['top1']:.4f} % "
                            f"for run {i}; the two files are from different trainings")
    return pred, labels


NO_PREDICTIONS = ("no per-sample predictions in these results (written before they were kept, or by an older "
                  "trainer): no interval, no chance level; retrain to get them")


def score_with_stats(results, predictions=None, metric="top1", n_boot=stats.N_BOOT, boot_seed=0,
                     level=stats.LEVEL):
    """:func:`score` plus, from per-sample predictions, the intervals, chance level, chance-corrected IIS and flag.

    Returns (scored, samples): ``scored`` is JSON-able (iis.json), with ``note`` saying why anything is missing;
    ``samples`` holds the bootstrap arrays and correctness matrix for paired comparisons (None without them).
    """
    s = score(results, metric)
    s.update(schema=SCORED_SCHEMA, iis_chance_corrected=None, chance=None, chance_level=None, interval=None,
             note=None, beats_standard=None, warnings=[])
    if predictions is None:
        s["note"] = NO_PREDICTIONS
        return s, None
    if metric != "top1":
        s["note"] = f"no interval or chance level for {metric}: the predictions hold each head's top-1 class only"
        return s, None
    pred, labels = predictions
    rows = np.array([p["pred_rows"] for p in s["per_seed"]])
    correct = pred[np.unique(rows)] == labels[None, :]      # only the heads that score, renumbered
    rows = np.searchsorted(np.unique(rows), rows)
    st, samples = stats.run_statistics(correct, rows, s["ratios"], labels, n_boot, boot_seed, level)
    # the point IIS from the predictions equals the one from results.json (checked by load_predictions); keep the
    # latter as the headline so a file without predictions and one with them print the same number
    s.update(iis_chance_corrected=st["iis_chance_corrected"], iis_chance_corrected_std=st["iis_chance_corrected_std"],
             chance=st["chance"], chance_level=st["chance_level"], n_val=st["n_val"])
    if samples is None:
        s["note"] = "no interval: the bootstrap is off (--bootstrap 0)"
        return s, {"correct": correct, "rows": rows, "labels": labels, "samples": None}
    s["interval"] = {k: st[f"{k}_interval"] for k in ("iis", "iis_chance_corrected", "standard_accuracy", "margin")}
    s["interval"].update(normalised=st["normalised_interval"], level=level, resamples=n_boot, bootstrap_seed=boot_seed,
                         covers="resampling of the val samples, heads fixed; seeds enter as their mean")
    s["beats_standard"], s["warnings"] = beats_standard(s, correct, rows, n_boot, boot_seed, level)
    return s, {"correct": correct, "rows": rows, "labels": labels, "samples": samples}


def beats_standard(s, correct, rows, n_boot, boot_seed, level):
    """(the concept heads of a scored run that beat their seed's standard probe by more than their paired interval,
    one warning line or none). Such a head means the standard accuracy is below what the features allow, so the
    curve's ratios above 1 (and the IIS) measure the probe, not the representation."""
    diff, lo, hi = stats.beats_standard(correct, rows, n_boot, boot_seed, level)
    flagged = [dict(seed=seed, ratio=r, difference=float(diff[i, j]), interval=[float(lo[i, j]), float(hi[i, j])])
               for i, seed in enumerate(s["seeds"]) for j, r in enumerate(s["ratios"]) if lo[i, j] > 0]
    if not flagged:
        return flagged, []
    worst = max(flagged, key=lambda f: f["difference"])
    return flagged, [f"{len(flagged)} of {diff.size} concept heads beat the standard probe by more than their "
                     f"{100 * level:g} % paired interval (most: s={worst['ratio']:g}, seed {worst['seed']}, "
                     f"{worst['difference']:+.2f} points [{worst['interval'][0]:+.2f}, {worst['interval'][1]:+.2f}]): "
                     f"the standard accuracy is not the features' linear classifiability and the IIS is inflated "
                     f"(docs/protocols.md, the standard probe)"]


# ---------------------------------------------------------------------------------------------------------------------
# Degenerate data: flags printed, stored in iis.json and shown in reports beside the chance level
# ---------------------------------------------------------------------------------------------------------------------
MIN_DEV_PER_CLASS = 5     # below this, a held-out epoch/lr choice is a coin toss between neighbouring heads
MIN_VAL = 100             # below these, a 95 % interval spans tens of points: it cannot separate runs
MIN_VAL_PER_CLASS = 10


def data_flags(results, scored):
    """[(code, line)] of what makes this score shaky: ``few-dev`` (epochs and lrs chosen on fewer than
    MIN_DEV_PER_CLASS held-out samples per class), ``few-val`` (fewer than MIN_VAL val samples or MIN_VAL_PER_CLASS
    per class), ``at-chance`` (the standard probe or concept heads at some ratios at or below the chance level)."""
    meta, key = results.get("meta", {}), results.get("key", {})
    n_classes = len(meta.get("classes") or []) or None
    flags = []
    n_train, n_val = meta.get("n_train"), meta.get("n_val") or scored.get("n_val")
    if meta.get("select_on", key.get("select_on")) == "holdout" and n_train and n_classes:
        fraction = key.get("holdout_fraction") or 0.1
        dev = max(int(round(fraction * n_train / n_classes)), 1)
        if dev < MIN_DEV_PER_CLASS:
            flags.append(("few-dev", f"epochs and lrs chosen on about {dev} held-out train samples per class "
                                     f"(fewer than {MIN_DEV_PER_CLASS}; {n_train} train samples, {n_classes} classes)"))
    if n_val and (n_val < MIN_VAL or (n_classes and n_val / n_classes < MIN_VAL_PER_CLASS)):
        per = f", {n_val / n_classes:.0f} per class" if n_classes else ""
        iv = (scored.get("interval") or {}).get("iis")
        width = f": the IIS interval is {iv[1] - iv[0]:.2f} wide" if iv else ""
        flags.append(("few-val", f"{n_val} val samples{per} (fewer than {MIN_VAL}, or {MIN_VAL_PER_CLASS} per "
                                 f"class){width}; differences between runs on so few samples mean little"))
    chance = scored.get("chance")
    if chance is not None:
        low = [r for r, a in zip(scored["ratios"], scored["accuracies"]) if a <= chance]
        if scored["standard_accuracy"] <= chance:
            flags.append(("at-chance", f"the standard probe ({scored['standard_accuracy']:.1f} %) is at or below "
                                       f"chance ({chance:.1f} %)"))
        elif low:
            shown = ", ".join(f"{r:g}" for r in low[:6]) + (" ..." if len(low) > 6 else "")
            flags.append(("at-chance", f"concept heads at or below chance ({chance:.1f} %) at s = {shown}"))
    return flags
