"""The Inherent Interpretability Score: area under (accuracy at sparsity s / standard accuracy) over s."""
import numpy as np

from .cli import UserError


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


def curve(runs, metric="top1"):
    """From a results file's runs: (standard accuracy, sorted ratios, accuracy per ratio), each the best over lrs."""
    std = [r[metric] for r in runs if r["head"] == "standard"]
    if not std:
        raise UserError("the results hold no standard linear probe run")
    best = {}
    for r in runs:
        if r["head"] == "concept":
            best[r["ratio"]] = max(best.get(r["ratio"], -np.inf), r[metric])
    ratios = sorted(best)
    return max(std), ratios, [best[s] for s in ratios]


def score(results, metric="top1"):
    """IIS of a results dict (the schema written by the training scripts), with the curve behind it."""
    std, ratios, accs = curve(results["runs"], metric)
    return {"iis": iis(ratios, accs, std), "standard_accuracy": std, "ratios": ratios, "accuracies": accs,
            "normalised": [a / std for a in accs], "metric": metric}
