"""Figures and tables from scored results."""
import csv
import io
import os

import numpy as np

from .fileio import atomic_write_bytes
from .stats import correlation_bootstrap, correlation_interval, correlations


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (imported on first use: only plotting needs it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path):
    """Write ``fig`` as a PNG atomically and close it; returns the absolute path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return os.path.abspath(path)


MARKERS = "osD^vPX*<>"
STYLES = ("-", "--", "-.", (0, (3, 1, 1, 1, 1, 1)))   # dotted ':' is kept for chance-level runs


def common_label(labels):
    """(the words every label shares, each label's own words): the shared part goes into a figure's title."""
    words = [lbl.split() for lbl in labels]
    common = [w for w in words[0] if all(w in ws for ws in words[1:])] if len(words) > 1 else []
    own = [" ".join(w for w in ws if w not in common) or " ".join(ws) for ws in words]
    return " ".join(common), own


def data_title(scored):
    """'fashion_mnist, n_train 2000, n_val 1000' when every run shares them, else each value list."""
    parts = []
    for key in ("dataset", "n_train", "n_val"):
        vals = sorted({str((s.get("meta") or {}).get(key)) for _, s in scored} - {"None"}, key=lambda v: (len(v), v))
        if vals:
            parts.append(f"{key + ' ' if key != 'dataset' else ''}{' / '.join(vals)}")
    return ", ".join(parts)


def plot_curves(scored, path, title="Accuracy kept under sparsity", caveat=None):
    """One PNG: accuracy / standard accuracy against sparsity ratio, one line per scored run (its own marker and line
    style), IIS in the legend, the data and the labels' common part in the title, the y range fitted to the data.

    The dashed line at 1.0 is the ceiling: a curve at 1.0 over the whole grid has IIS = the grid's width (0.98 for
    the default grid), the maximum. A run with a bootstrap interval gets a shaded band (the per-ratio interval of its
    normalised curve); a single run without one keeps the shaded area under its curve (the area is the IIS)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    common, own = common_label([lbl for lbl, _ in scored])
    sizes = {((s.get("meta") or {}).get("n_train"), (s.get("meta") or {}).get("n_val")) for _, s in scored}
    if len(sizes) > 1:   # runs on other subsets: each label says which
        own = [f"{name} (n {(s.get('meta') or {}).get('n_train')}/{(s.get('meta') or {}).get('n_val')})"
               for name, (_, s) in zip(own, scored)]
    lo, hi = 1.0, 1.0
    for i, ((_, s), name) in enumerate(zip(scored, own)):
        band = (s.get("interval") or {}).get("normalised")
        iv = (s.get("interval") or {}).get("iis")
        text = f"{name}: IIS {s['iis']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "") + \
            (" (chance-level)" if s.get("chance_level") else "")
        line, = ax.plot(s["ratios"], s["normalised"], marker=MARKERS[i % len(MARKERS)], ms=4, label=text,
                        ls=":" if s.get("chance_level") else STYLES[i % len(STYLES)])
        lo, hi = min(lo, *s["normalised"]), max(hi, *s["normalised"])
        if band:
            ax.fill_between(s["ratios"], band[0], band[1], color=line.get_color(), alpha=0.15, lw=0)
            lo, hi = min(lo, *band[0]), max(hi, *band[1])
        elif len(scored) == 1:
            ax.fill_between(s["ratios"], s["normalised"], alpha=0.15)
    ratios = scored[0][1]["ratios"]
    width = max(ratios) - min(ratios)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.annotate(f"1.0 = standard top-1 (the ceiling: IIS max = {width:g}, the grid's width)", (min(ratios), 1.0),
                xytext=(2, 3), textcoords="offset points", fontsize=7, color="grey")
    pad = max(0.02, 0.08 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad) if len(scored) > 1 or lo > 0.5 else 0.0, hi + 1.5 * pad)
    ax.set_xlabel("sparsity ratio s (fraction of concepts zeroed per sample)")
    ax.set_ylabel("top-1 at s / standard top-1")
    ax.set_xlim(min(0.0, min(ratios)) - 0.02, max(ratios) + 0.02)
    full = title + (f": {common}" if common else "") + f"\n{data_title(scored)}"
    if any((s.get("interval") or {}).get("normalised") for _, s in scored):
        lv = next(s["interval"]["level"] for _, s in scored if s.get("interval"))
        full += f"; bands: {100 * lv:g} % bootstrap interval over val samples"
    if caveat:
        full += "\nNOT PAIRED: runs on different val sets"
    ax.set_title(full, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(scored) > 6 else 8, loc="lower left")
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Comparison reports
# ---------------------------------------------------------------------------------------------------------------------
COLUMNS = ("backbone", "weights", "layer", "dataset", "n_train", "n_val", "val_set", "concept_type", "select_on",
           "seeds", "standard_top1", "standard_lo", "standard_hi", "chance", "chance_level", "flags", "iis", "iis_std",
           "iis_lo", "iis_hi", "iis_cc", "iis_cc_lo", "iis_cc_hi")
FLOOR_COLUMNS = ("floor", "floor_std", "lift", "lift_lo", "lift_hi", "lift_p")
VERSUS = ("vs_next", "vs_next_diff", "vs_next_lo", "vs_next_hi", "vs_next_p")


def _r(v, nd):
    return None if v is None else round(float(v), nd)


def floor_columns(s):
    """A scored run's floor columns: the random-concept floor IIS, its spread over draws, and the concept lift
    (IIS - floor) with its paired interval and p-value (utils/floor.score); None where the run has no floor."""
    f = s.get("floor") or {}
    iv = f.get("lift_interval") or [None, None]
    return {"floor": _r(f.get("iis"), 4), "floor_std": _r(f.get("iis_std"), 4), "lift": _r(f.get("lift"), 4),
            "lift_lo": _r(iv[0], 4), "lift_hi": _r(iv[1], 4), "lift_p": _r(f.get("lift_p"), 4)}


def table_rows(scored, comparisons=None):
    """One dict per scored run: the identifying columns, standard top-1, IIS with its spread over seeds and interval,
    the chance level, flag and chance-corrected IIS, top-1 at each ratio and, given ``comparisons`` (one per pair of
    neighbouring runs: a :func:`utils.stats.compare` dict with ``line``, or ``{"reason": ...}``), the paired verdict
    of each row against the next. Missing values are None (an empty CSV cell)."""
    rows = []
    for i, (_, s) in enumerate(scored):
        m = s["meta"]
        iv = s.get("interval") or {}
        row = {"backbone": m.get("backbone"), "weights": m.get("weights_label") or m.get("weights"),
               "layer": m.get("layer"), "dataset": m.get("dataset"), "n_train": m.get("n_train"),
               "n_val": m.get("n_val"), "val_set": (m.get("val_samples") or "")[:8] or None,
               "concept_type": m.get("concept_type"), "select_on": m.get("select_on"),
               "flags": " ".join(f["code"] for f in s.get("flags") or []) or None, "_flags": s.get("flags") or [],
               "seeds": len(s.get("seeds", [0])),
               "standard_top1": round(s["standard_accuracy"], 2),
               "standard_lo": _r(iv.get("standard_accuracy", [None])[0], 2),
               "standard_hi": _r(iv.get("standard_accuracy", [None, None])[1], 2),
               "chance": _r(s.get("chance"), 2),
               "chance_level": {True: "yes", False: "no"}.get(s.get("chance_level")),
               "iis": round(s["iis"], 4), "iis_std": _r(s.get("iis_std"), 4),
               "iis_lo": _r(iv.get("iis", [None])[0], 4), "iis_hi": _r(iv.get("iis", [None, None])[1], 4),
               "iis_cc": _r(s.get("iis_chance_corrected"), 4),
               "iis_cc_lo": _r(iv.get("iis_chance_corrected", [None])[0], 4),
               "iis_cc_hi": _r(iv.get("iis_chance_corrected", [None, None])[1], 4)}
        row.update(floor_columns(s))
        row.update({f"top1@{r:g}": round(a, 2) for r, a in zip(s["ratios"], s["accuracies"])})
        if comparisons is not None:
            c = comparisons[i] if i < len(comparisons) else None
            if c is None:
                row.update(dict.fromkeys(VERSUS))
            elif "reason" in c:
                row.update(dict.fromkeys(VERSUS), vs_next=f"not compared: {c['reason']}")
            else:
                row.update(vs_next={">": "> next", "<": "< next", "=": "no detectable difference"}[c["verdict"]],
                           vs_next_diff=_r(c["difference"], 4), vs_next_lo=_r(c["interval"][0], 4),
                           vs_next_hi=_r(c["interval"][1], 4), vs_next_p=_r(c["p"], 4))
        rows.append(row)
    return rows


def _cell(v):
    return "–" if v is None else str(v)


def _with_interval(v, lo, hi, std=None):
    if v is None:
        return "–"
    out = f"{v}" + (f" ± {std}" if std is not None else "")
    return out + (f" [{lo}, {hi}]" if lo is not None else "")


def write_table(rows, md_path, csv_path, comparisons=None, corr=None, notes=()):
    """report.csv: every column of ``rows`` as numbers; report.md: the same values laid out for reading (value ±
    std over seeds [interval]), chance-level runs marked, the flags and ``notes`` spelled out, the correlation (or why
    there is none), then the paired verdicts between neighbouring rows."""
    cols = list(COLUMNS) + list(FLOOR_COLUMNS) + \
        [c for c in rows[0] if c not in COLUMNS + FLOOR_COLUMNS + VERSUS and c[0] != "_"] + \
        [c for c in VERSUS if c in rows[0]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    ratio_cols = [c for c in cols if c.startswith("top1@")]
    head = ["#", "backbone", "weights", "layer", "dataset", "n_train", "n_val", "concept_type", "chosen on", "seeds",
            "standard top-1 [95 %]", "IIS ± std over seeds [95 %]", "chance-corrected IIS [95 %]", "chance",
            "chance-level", "flags", "floor ± std over draws", "concept lift [95 % paired]"] + ratio_cols
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        iis_cell = _with_interval(r["iis"], r["iis_lo"], r["iis_hi"], r["iis_std"])
        if r["chance_level"] == "yes":
            iis_cell = f"**{iis_cell}** (chance-level)"
        cells = [i + 1, r["backbone"], r["weights"], r["layer"], r["dataset"], r.get("n_train"), r.get("n_val"),
                 r["concept_type"], r.get("select_on"), r["seeds"],
                 _with_interval(r["standard_top1"], r["standard_lo"], r["standard_hi"]), iis_cell,
                 _with_interval(r["iis_cc"], r["iis_cc_lo"], r["iis_cc_hi"]), r["chance"], r["chance_level"],
                 r.get("flags"), _with_interval(r.get("floor"), None, None, r.get("floor_std")),
                 _with_interval(r.get("lift"), r.get("lift_lo"), r.get("lift_hi"))]
        md.append("| " + " | ".join(_cell(c) for c in cells + [r.get(c) for c in ratio_cols]) + " |")
    extra = [f"* {n}" for n in notes] + [f"* row {i + 1} flag {f['code']}: {f['line']}" for i, r in enumerate(rows)
                                         for f in r.get("_flags") or []]
    if corr is not None:
        extra.append(f"* IIS vs standard top-1: {corr_line(corr)}")
    if extra:
        md += [""] + extra
    if comparisons:
        md += ["", "Paired comparisons of neighbouring rows (same val samples, same bootstrap resamples):", ""]
        for i, c in enumerate(comparisons):
            a, b = (f"row {i + 1} ({rows[i]['backbone']}@{rows[i]['layer']} {rows[i]['concept_type']})",
                    f"row {i + 2} ({rows[i + 1]['backbone']}@{rows[i + 1]['layer']} {rows[i + 1]['concept_type']})")
            md.append(f"* {a} vs {b}: " + (f"not compared: {c['reason']}" if "reason" in c else c["line"]))
    atomic_write_bytes(md_path, ("\n".join(md) + "\n").encode())


MIN_DISTINCT = 3   # a correlation over fewer distinct accuracies is a line through two points


def correlation_summary(rows, samples=None):
    """Correlations of IIS with standard top-1 over the rows not flagged chance-level (a chance-level IIS is noise
    near the grid's width and would dominate them), with Fisher-z 95 % intervals over runs and, given ``samples``
    (per row, the bootstrap arrays of utils.stats.run_samples, all drawn on the same resamples of the same val
    samples), percentile intervals over val samples (utils/stats.py says what each answers). None with a ``reason``
    when the rows were scored on different val sets (or sizes) or hold fewer than MIN_DISTINCT distinct accuracies.
    Returns a dict; ``no_scatter`` says why a scatter would show nothing (every point at one accuracy), else None."""
    keep = [i for i, r in enumerate(rows) if r.get("chance_level") != "yes"]
    kept = [rows[i] for i in keep]
    out = {"n": len(kept), "left_out": len(rows) - len(kept), "pearson": None, "spearman": None,
           "pearson_interval": None, "spearman_interval": None, "bootstrap": None, "reason": None, "no_scatter": None}
    distinct = len({r["standard_top1"] for r in kept})
    if len({r["standard_top1"] for r in rows}) < 2:
        out["no_scatter"] = "every run has the same standard top-1, so IIS has nothing to vary against"
    sets = {(r.get("dataset"), r.get("n_val"), r.get("val_set")) for r in rows}
    if len(sets) > 1:
        out["reason"] = (f"the runs were scored on {len(sets)} different val sets (" +
                         "; ".join(f"{d} n_val {n}" for d, n, _ in sorted(sets, key=str)) + "): a correlation "
                         "across them would mix subset sizes with interpretability")
    elif distinct < MIN_DISTINCT:
        out["reason"] = (f"{distinct} distinct standard top-1 value{'s' * (distinct != 1)} among the {len(kept)} runs "
                         f"not at chance level: a correlation needs at least {MIN_DISTINCT}")
    else:
        out["pearson"], out["spearman"] = correlations([r["standard_top1"] for r in kept], [r["iis"] for r in kept])
        out["pearson_interval"] = list(correlation_interval(out["pearson"], len(kept)))
        out["spearman_interval"] = list(correlation_interval(out["spearman"], len(kept), spearman=True))
        picked = [samples[i] for i in keep] if samples is not None else []
        if picked and all(p is not None for p in picked):
            out["bootstrap"] = correlation_bootstrap(np.stack([p["standard"] for p in picked], 1),
                                                     np.stack([p["iis"] for p in picked], 1))
    return out


def corr_line(corr):
    """The correlation in words: r and rho with their intervals (over runs; over val samples where there are
    paired resamples), or why there is none."""
    left = f", {corr['left_out']} chance-level left out" if corr["left_out"] else ""
    if corr["reason"]:
        return f"no correlation: {corr['reason']}"

    def ci(v):
        return "" if v is None or v[0] != v[0] else f" [{v[0]:.3f}, {v[1]:.3f}]"   # v != v: NaN, below 4 runs
    out = (f"over {corr['n']} runs{left}: Pearson {corr['pearson']:.3f}{ci(corr['pearson_interval'])}, "
           f"Spearman {corr['spearman']:.3f}{ci(corr['spearman_interval'])} (95 % Fisher-z intervals over runs)")
    b = corr.get("bootstrap")
    if b and b["resamples"]:
        out += (f"; over val samples: Pearson{ci(b['pearson'])}, Spearman{ci(b['spearman'])} (95 % percentile "
                f"intervals, {b['resamples']} paired bootstrap resamples)")
    return out


def plot_scatter(rows, path, corr=None):
    """IIS against standard top-1, one point per run (marker by concept type) with error bars where there are
    bootstrap intervals; chance-level runs hollow and left out of the correlation. Nothing is drawn (returns None)
    when every run has one standard top-1 (``corr['no_scatter']``); else returns the PNG's path."""
    corr = corr or correlation_summary(rows)
    if corr["no_scatter"]:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    markers = dict(zip(sorted({r["concept_type"] for r in rows}), "osD^vP*X"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (ct, mk) in enumerate(markers.items()):
        col = colours[i % len(colours)]
        pts = [r for r in rows if r["concept_type"] == ct]
        for hollow in (False, True):
            sel = [r for r in pts if (r.get("chance_level") == "yes") == hollow]
            if not sel:
                continue
            ax.scatter([r["standard_top1"] for r in sel], [r["iis"] for r in sel], marker=mk, s=45, zorder=3,
                       facecolors="white" if hollow else col, edgecolors=col,
                       label=f"{ct}, chance-level (left out)" if hollow else ct)
        for r in pts:
            if r.get("iis_lo") is None and r.get("standard_lo") is None:
                continue
            xe = None if r.get("standard_lo") is None else [[r["standard_top1"] - r["standard_lo"]],
                                                             [r["standard_hi"] - r["standard_top1"]]]
            ye = None if r.get("iis_lo") is None else [[r["iis"] - r["iis_lo"]], [r["iis_hi"] - r["iis"]]]
            ax.errorbar([r["standard_top1"]], [r["iis"]], xerr=xe, yerr=ye, fmt="none", ecolor=col, elinewidth=0.9,
                        capsize=2, alpha=0.8, zorder=2)
    names = [f"{r['backbone']}@{r['layer']}" + (f" {r['weights']}" if str(r.get("weights")).startswith("ft:")
                                                 else "") for r in rows]
    common, own = common_label(names)
    for r, name in zip(rows, own):
        ax.annotate(name, (r["standard_top1"], r["iis"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    bars = any(r.get("iis_lo") is not None for r in rows)
    title = "IIS vs classifiability" + (f": {common}" if common else "") + f" ({len(rows)} runs"
    title += (", bars: 95 % bootstrap intervals)" if bars else ")")
    line = corr_line(corr).replace(" (95 % Fisher-z intervals over runs)", " (Fisher z, over runs)")
    line = line.replace("; over val samples", "\nover val samples").split(" (95 % percentile")[0]
    ax.set_title(f"{title}\n{line}", fontsize=8, wrap=True)
    ax.set_xlabel("standard top-1 (%)")
    ax.set_ylabel("IIS")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
