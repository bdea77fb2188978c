"""How far to trust an IIS: bootstrap intervals over val samples, spread over seeds, a paired comparison of two runs,
the chance level of the val labels and the chance-corrected IIS. Pure NumPy, deterministic given a seed.

Conventions. Accuracies are in percent. ``correct`` is a boolean (H, N) matrix: head h got val sample i right. A run's
*selection* ``rows`` is an int array (S, 1 + R): for each of its S seeds, the row of ``correct`` of its standard probe,
then the rows of the heads that supply the accuracy at each of the R sparsity ratios (chosen by
:func:`utils.iis.select`). The selection is held fixed inside the bootstrap: the intervals say how much the chosen
heads' accuracies move with the val sample, not how the choice of lr or epoch would move (those predictions are not
kept).

Statistics chosen, and why:

* **Interval**: percentile bootstrap over val samples (N draws with replacement, ``n_boot`` times; 95 % = the 2.5th
  and 97.5th percentiles). Every head's accuracy, the standard accuracy, the chance level and the IIS are recomputed
  on each resample, so the interval accounts for the correlation between a run's heads (they see the same images).
  With thousands of val samples the IIS is a smooth function of many means, the case the percentile interval suits.
* **Paired comparison**: the difference A - B recomputed on the *same* resamples of the shared val samples; the 95 %
  interval is its percentile interval and the p-value is two-sided, read off the same bootstrap distribution:
  p = min(1, 2 (1 + #{d <= 0}) / (B + 1), 2 (1 + #{d >= 0}) / (B + 1)), the smallest level at which the matching
  two-sided percentile interval would exclude 0 (the +1 keeps p away from an impossible 0: with B resamples nothing
  below 2 / (B + 1) can be claimed). Pairing removes the per-image difficulty both runs share, so it detects much
  smaller differences than comparing two separate intervals.
* **Chance level**: the majority-class rate of the val labels (what always answering the commonest class scores),
  recomputed on each resample.
* **Chance-corrected IIS**: the same trapezoid area with each accuracy taken as (acc - chance) / (standard - chance),
  clipped to [0, 1]: a head at or below chance keeps nothing, and no head keeps more than all of the standard probe's
  margin over chance. The whole curve is 0 when the standard accuracy is at or below chance (a probe that does not
  beat guessing the majority class has nothing for the concepts to keep). The clip keeps the score in [0, grid width]
  and finite when the standard probe beats chance by a hair (unclipped, a 0.01-point margin turns a 1-point noise
  into a ratio of 100). It equals the paper's IIS when chance is 0 and no head beats the standard probe, and drops
  below it as the accuracies approach chance: at chance / chance the paper's ratio is about 1 (an IIS near the grid's
  width) while this one is about 0.
* **Chance flag**: a run is *chance-level* when the lower end of the bootstrap interval of (standard accuracy -
  chance) is at or below 0, i.e. its standard probe is not above chance by its own interval.
* **Correlation intervals** (over runs in a report), two, answering different questions. *Over runs*: Fisher z,
  tanh(atanh(r) -/+ z_0.975 se), se = 1/sqrt(n - 3) for Pearson and sqrt(1.06 / (n - 3)) for Spearman (Fieller,
  Hartley and Pearson, 1957): closed form, treats each run's point as exact and the runs as a sample of possible
  runs, needs n >= 4. *Over val samples* (:func:`correlation_bootstrap`): the correlation recomputed on each paired
  resample of the shared val samples (every run's standard top-1 and IIS on the same draw) and its percentile
  interval: these runs held fixed, how much the measured correlation moves with the val sample alone. Runs that
  are not a random sample (a series built to differ in classifiability) are better read by the second; the first
  says how little a handful of points can establish.
"""
import math
import statistics

import numpy as np

LEVEL = 0.95
N_BOOT = 1000


# ---------------------------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------------------------
def trapezoid(ratios, y):
    """Trapezoid area of ``y`` (..., R) over the sorted ``ratios`` (R,): (...)."""
    r = np.asarray(ratios, dtype=float)
    if np.any(np.diff(r) <= 0):
        raise ValueError(f"ratios must be strictly increasing, got {r.tolist()}")
    y = np.asarray(y, dtype=float)
    return ((y[..., 1:] + y[..., :-1]) * (np.diff(r) / 2.0)).sum(-1)


def chance_level(labels):
    """Majority-class rate (%) of ``labels``: the accuracy of always answering the commonest class."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError("chance_level needs a non-empty 1-D label array")
    return 100.0 * np.bincount(labels).max() / len(labels)


def chance_corrected(accuracies, standard, chance):
    """(acc - chance) / (standard - chance) clipped to [0, 1], broadcast over leading axes: ``accuracies`` (..., R),
    ``standard`` and ``chance`` (...). Where the standard accuracy is at or below chance the whole curve is 0."""
    acc = np.asarray(accuracies, dtype=float)
    margin = np.asarray(standard, dtype=float) - np.asarray(chance, dtype=float)
    above = margin > 0
    safe = np.where(above, margin, 1.0)   # the value under a False mask is discarded; this only avoids 0-division
    out = (acc - np.asarray(chance, dtype=float)[..., None]) / safe[..., None]
    return np.where(above[..., None], np.clip(out, 0.0, 1.0), 0.0)


def curve_statistics(acc_heads, rows, ratios, chance=None):
    """Per-seed curves from the accuracies of every head.

    ``acc_heads`` (..., H) accuracies (%), ``rows`` (S, 1 + R) selection, ``ratios`` (R,) sorted, ``chance`` (...) or
    None. Returns arrays over (..., S): ``standard``, ``iis``, ``iis_cc`` (with chance); and (..., S, R):
    ``accuracies``, ``normalised``.
    """
    rows = np.asarray(rows)
    sel = np.asarray(acc_heads, dtype=float)[..., rows]          # (..., S, 1 + R)
    std, acc = sel[..., 0], sel[..., 1:]
    with np.errstate(divide="ignore", invalid="ignore"):          # a resample whose standard accuracy is 0: NaN
        norm = np.where(std[..., None] > 0, acc / std[..., None], np.nan)
    out = {"standard": std, "accuracies": acc, "normalised": norm, "iis": trapezoid(ratios, norm)}
    if chance is not None:
        c = np.broadcast_to(np.asarray(chance, dtype=float)[..., None], std.shape)
        out["iis_cc"] = trapezoid(ratios, chance_corrected(acc, std, c))
    return out


def seed_spread(values):
    """(mean, sample standard deviation) over seeds; the deviation is None with a single seed."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap over val samples
# ---------------------------------------------------------------------------------------------------------------------
def resample_counts(n, n_boot=N_BOOT, seed=0):
    """Yield (start, counts) with counts (c, n) int: how often resample start + j drew val sample i.

    The draws depend only on (n, n_boot, seed) — the chunk size is a function of n alone — so two runs scored on the
    same n val samples with the same seed see the same resamples, and the difference of their bootstrap samples is a
    paired bootstrap. Counts instead of index lists turn each accuracy into one matrix product; chunks keep the
    (c, n) block near 4 M entries whatever n is.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, (1 << 22) // max(n, 1)))
    start = 0
    while start < n_boot:
        c = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(c, n))
        idx += np.arange(c)[:, None] * n                    # resample j's draws land in bins j*n ... j*n + n - 1
        yield start, np.bincount(idx.ravel(), minlength=c * n).reshape(c, n)
        start += c


def bootstrap_accuracies(correct, labels=None, n_boot=N_BOOT, seed=0):
    """Accuracy (%) of every head on each of ``n_boot`` resamples of the val samples: (n_boot, H); with ``labels``,
    also the chance level (%) on each resample: (n_boot,) (else None).

    The chance level on a resample is the accuracy there of the one majority-class answer of the whole val set (the
    class :func:`chance_level` counts; ties: the lowest label), a head held fixed like the others. Not the resample's
    own majority rate: the maximum of the class counts is biased upwards (with 3 balanced classes of 10 samples its
    mean is ~43 %, not 33 %), which put the point chance-corrected IIS outside its own interval."""
    correct = np.asarray(correct, dtype=bool)
    h, n = correct.shape
    # float32 sums of 0/1 weighted by integer counts are exact below 2**24 draws; beyond that, float64
    dt = np.float32 if n < (1 << 24) else np.float64
    right = np.ascontiguousarray(correct.T, dtype=dt)                 # (n, H)
    acc = np.empty((n_boot, h))
    chance = None
    if labels is not None:
        labels = np.asarray(labels)
        majority = (labels == np.bincount(labels).argmax()).astype(dt)   # (n,): where the majority answer is right
        chance = np.empty(n_boot)
    for start, counts in resample_counts(n, n_boot, seed):
        c = len(counts)
        acc[start:start + c] = (counts.astype(dt) @ right) * (100.0 / n)
        if labels is not None:
            chance[start:start + c] = (counts.astype(dt) @ majority) * (100.0 / n)
    return acc, chance


def interval(samples, level=LEVEL, axis=0):
    """Percentile interval (lo, hi) of bootstrap ``samples`` along ``axis`` (NaN resamples ignored)."""
    tail = 100.0 * (1.0 - level) / 2.0
    s = np.asarray(samples, dtype=float)
    lo, hi = np.nanpercentile(np.where(np.isfinite(s), s, np.nan), [tail, 100.0 - tail], axis=axis)
    return lo, hi


def run_samples(correct, rows, ratios, labels, n_boot=N_BOOT, seed=0):
    """Bootstrap samples of one run's statistics, each averaged over its seeds: ``iis``, ``iis_cc``, ``standard``,
    ``margin`` (standard - chance) and ``chance`` (n_boot,), and ``normalised`` (n_boot, R)."""
    acc, chance = bootstrap_accuracies(correct, labels, n_boot, seed)
    st = curve_statistics(acc, rows, ratios, chance)
    std = st["standard"].mean(-1)
    return {"iis": st["iis"].mean(-1), "iis_cc": st["iis_cc"].mean(-1), "standard": std, "margin": std - chance,
            "chance": chance, "normalised": st["normalised"].mean(-2)}


def run_statistics(correct, rows, ratios, labels, n_boot=N_BOOT, seed=0, level=LEVEL):
    """Point estimates and, with ``n_boot`` > 0, bootstrap intervals of one run; returns (stats, samples).

    ``stats`` is JSON-able: ``iis``/``iis_std`` (mean and std over seeds), ``iis_chance_corrected``, ``chance``,
    ``standard_accuracy``, ``normalised`` and, with a bootstrap, ``*_interval`` entries and the ``chance_level``
    flag (None without a bootstrap). ``samples`` holds the bootstrap arrays (None without one), for pairing.
    """
    correct = np.asarray(correct, dtype=bool)
    rows = np.asarray(rows)
    chance = chance_level(labels)
    st = curve_statistics(100.0 * correct.mean(1), rows, ratios, chance)
    iis, iis_std = seed_spread(st["iis"])
    iis_cc, iis_cc_std = seed_spread(st["iis_cc"])
    out = {"n_val": int(correct.shape[1]), "n_seeds": int(len(rows)), "iis": iis, "iis_std": iis_std,
           "iis_chance_corrected": iis_cc, "iis_chance_corrected_std": iis_cc_std, "chance": float(chance),
           "standard_accuracy": float(st["standard"].mean()), "normalised": st["normalised"].mean(0).tolist(),
           "chance_level": None, "resamples": int(n_boot), "bootstrap_seed": int(seed), "level": level}
    if n_boot <= 0:
        # without an interval only a standard probe at or below chance is known to be chance-level
        out["chance_level"] = True if out["standard_accuracy"] <= chance else None
        return out, None
    samples = run_samples(correct, rows, ratios, labels, n_boot, seed)
    for name, key in (("iis", "iis"), ("iis_chance_corrected", "iis_cc"), ("standard_accuracy", "standard"),
                      ("margin", "margin")):
        lo, hi = interval(samples[key], level)
        out[f"{name}_interval"] = [float(lo), float(hi)]
    lo, hi = interval(samples["normalised"], level)
    out["normalised_interval"] = [lo.tolist(), hi.tolist()]
    out["chance_level"] = bool(out["margin_interval"][0] <= 0.0)
    return out, samples


def beats_standard(correct, rows, n_boot=N_BOOT, seed=0, level=LEVEL):
    """How far each chosen concept head is above its seed's standard probe, paired: for a selection ``rows``
    (S, 1 + R), the top-1 differences head - standard in points (S, R) and their ``level`` percentile interval
    (lo, hi), each (S, R), over the same resamples for the head and the probe. A lower end above 0 says the head beats
    the probe by more than its interval: the denominator then is not the features' linear classifiability."""
    correct = np.asarray(correct, dtype=bool)
    rows = np.asarray(rows)
    full = 100.0 * correct.mean(1)
    acc, _ = bootstrap_accuracies(correct, None, n_boot, seed)
    lo, hi = interval(acc[:, rows[:, 1:]] - acc[:, rows[:, :1]], level)
    return full[rows[:, 1:]] - full[rows[:, :1]], lo, hi


# ---------------------------------------------------------------------------------------------------------------------
# Paired comparison
# ---------------------------------------------------------------------------------------------------------------------
def compare(samples_a, samples_b, observed, n_val, level=LEVEL):
    """A - B from bootstrap samples drawn on the same resamples of the same val samples.

    ``samples_*`` (n_boot,), ``observed`` = the difference on the full val set. Returns ``difference``,
    ``interval``, ``p`` (two-sided, see the module docstring), ``verdict`` ('>', '<' or '=') and the sizes.
    """
    d = np.asarray(samples_a, dtype=float) - np.asarray(samples_b, dtype=float)
    d = d[np.isfinite(d)]
    b = len(d)
    if b == 0:
        raise ValueError("no finite bootstrap differences to compare")
    lo, hi = interval(d, level)
    p = min(1.0, 2.0 * (1 + np.sum(d <= 0)) / (b + 1), 2.0 * (1 + np.sum(d >= 0)) / (b + 1))
    verdict = "=" if p >= 1.0 - level else (">" if observed > 0 else "<")
    return {"difference": float(observed), "interval": [float(lo), float(hi)], "p": float(p), "verdict": verdict,
            "n_val": int(n_val), "resamples": int(b), "level": level}


def paired_bootstrap(correct_a, rows_a, ratios_a, correct_b, rows_b, ratios_b, labels, n_boot=N_BOOT, seed=0,
                     level=LEVEL, statistic="iis"):
    """Paired bootstrap of IIS(A) - IIS(B) (or ``statistic="iis_cc"``) for two runs scored on the same val samples:
    both runs' heads are stacked into one matrix, so every resample is literally the same draw for both."""
    ca, cb = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if ca.shape[1] != cb.shape[1] or ca.shape[1] != len(labels):
        raise ValueError("paired runs must hold predictions for the same val samples")
    both = np.concatenate([ca, cb])
    rows_b = np.asarray(rows_b) + len(ca)
    acc, chance = bootstrap_accuracies(both, labels, n_boot, seed)
    key = "iis" if statistic == "iis" else "iis_cc"
    full = 100.0 * both.mean(1)
    c0 = chance_level(labels)
    obs = [curve_statistics(full, r, q, c0)[key].mean() for r, q in ((rows_a, ratios_a), (rows_b, ratios_b))]
    sa = curve_statistics(acc, rows_a, ratios_a, chance)[key].mean(-1)
    sb = curve_statistics(acc, rows_b, ratios_b, chance)[key].mean(-1)
    return compare(sa, sb, obs[0] - obs[1], len(labels), level)


# Student's t 97.5 % quantiles for 1..30 degrees of freedom (beyond: the normal's 1.96 is within 0.05 of them)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seed_interval(values):
    """(mean, sample std, 95 % t interval (lo, hi)) of per-seed values (e.g. paired differences, one per seed): the
    spread over seeds, where :func:`compare` gives the spread over val samples of one seed. None where undefined."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return None, None, None
    if len(v) == 1:
        return float(v[0]), None, None
    m, sd = float(v.mean()), float(v.std(ddof=1))
    t = T975[len(v) - 2] if len(v) - 1 <= len(T975) else 1.96
    half = t * sd / math.sqrt(len(v))
    return m, sd, (m - half, m + half)


def verdict_line(cmp, a="A", b="B", seeds=None):
    """One line: 'A > B', 'A < B' or 'no detectable difference at n = ...', with the difference, interval and p."""
    pct = f"{100 * cmp['level']:g} %"
    floor = 2.0 / (cmp["resamples"] + 1)       # no resample on the other side of 0: the true p is smaller still
    p = f"<= {floor:.2g}" if cmp["p"] <= floor * (1 + 1e-9) else f"= {cmp['p']:.3g}"
    detail = (f"(IIS difference {cmp['difference']:+.4f}, {pct} paired bootstrap interval [{cmp['interval'][0]:+.4f}, "
              f"{cmp['interval'][1]:+.4f}], two-sided p {p}, {cmp['resamples']} resamples)")
    if cmp["verdict"] == ">":
        head = f"{a} > {b}"
    elif cmp["verdict"] == "<":
        head = f"{a} < {b}"
    else:
        head = f"no detectable difference between {a} and {b} at n = {cmp['n_val']} val samples" + (
            f", {seeds} seeds" if seeds else "")
    return f"{head} {detail}"


# ---------------------------------------------------------------------------------------------------------------------
# Correlations over runs
# ---------------------------------------------------------------------------------------------------------------------
def ranks(v):
    """Average ranks (0-based) along the last axis: tied values share the mean of the ranks they span."""
    v = np.asarray(v, dtype=float)
    below = (v[..., None, :] < v[..., :, None]).sum(-1)
    tied = (v[..., None, :] == v[..., :, None]).sum(-1)
    return below + (tied - 1) / 2.0


def pearson(x, y):
    """Pearson r along the last axis; NaN where either has no spread or there are fewer than 3 points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    x, y = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (x * y).sum(-1) / np.where(den > 0, den, 1.0), np.nan)
    return np.where(x.shape[-1] >= 3, np.clip(r, -1.0, 1.0), np.nan)


def correlations(x, y):
    """(Pearson r, Spearman rho) along the last axis: floats for two sequences, arrays for rows of them."""
    r, rho = pearson(x, y), pearson(ranks(x), ranks(y))
    return (float(r), float(rho)) if np.ndim(r) == 0 else (r, rho)


def correlation_bootstrap(x_samples, y_samples, level=LEVEL):
    """Percentile intervals of Pearson and Spearman over paired bootstrap resamples: ``x_samples``, ``y_samples``
    (n_boot, n) hold each of n runs' values on resample j in row j (the same draw of the val samples for every run).
    Returns {"pearson": [lo, hi], "spearman": [lo, hi], "resamples": the resamples where both are defined}."""
    r, rho = correlations(np.asarray(x_samples, dtype=float), np.asarray(y_samples, dtype=float))
    ok = np.isfinite(r) & np.isfinite(rho)
    if not ok.any():
        return {"pearson": [float("nan")] * 2, "spearman": [float("nan")] * 2, "resamples": 0}
    return {"pearson": [float(v) for v in interval(r[ok], level)],
            "spearman": [float(v) for v in interval(rho[ok], level)], "resamples": int(ok.sum())}


def correlation_interval(r, n, level=LEVEL, spearman=False):
    """Fisher-z interval of a Pearson (or, with the 1.06 variance factor, Spearman) correlation ``r`` over ``n``
    points; (nan, nan) when r is undefined or n < 4 (the standard error 1/sqrt(n - 3) needs n > 3)."""
    if n < 4 or not math.isfinite(r):
        return float("nan"), float("nan")
    se = math.sqrt((1.06 if spearman else 1.0) / (n - 3))
    q = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
    z = math.atanh(max(-1 + 1e-12, min(1 - 1e-12, r)))   # |r| = 1 would be an infinite z
    return math.tanh(z - q * se), math.tanh(z + q * se)
