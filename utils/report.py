"""Figures and tables from scored results."""
import csv
import io
import os

import numpy as np

from .fileio import atomic_write_bytes
from .stats import correlation_interval


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


def plot_curves(scored, path, title="Accuracy kept under sparsity"):
    """One PNG: accuracy / standard accuracy against sparsity ratio, one line per scored run, IIS in the legend.

    A run with a bootstrap interval gets a shaded band (the per-ratio interval of its normalised curve); a single run
    without one keeps the shaded area under its curve (the area is the IIS)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    top = 1.05
    for label, s in scored:
        band = (s.get("interval") or {}).get("normalised")
        iv = (s.get("interval") or {}).get("iis")
        text = f"{label}  (IIS {s['iis']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "") + \
            (", chance-level" if s.get("chance_level") else "") + ")"
        line, = ax.plot(s["ratios"], s["normalised"], marker="o", ms=4, label=text,
                        ls=":" if s.get("chance_level") else "-")
        if band:
            ax.fill_between(s["ratios"], band[0], band[1], color=line.get_color(), alpha=0.2, lw=0)
            top = max(top, max(band[1]) + 0.05)
        elif len(scored) == 1:
            ax.fill_between(s["ratios"], s["normalised"], alpha=0.15)
        top = max(top, max(s["normalised"]) + 0.05)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("sparsity ratio s (fraction of concepts zeroed per sample)")
    ax.set_ylabel("top-1 at s / standard top-1")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, top)
    if any((s.get("interval") or {}).get("normalised") for _, s in scored):
        lv = next(s["interval"]["level"] for _, s in scored if s.get("interval"))
        title += f"\n(bands: {100 * lv:g} % bootstrap interval over val samples)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(scored) > 6 else 8, loc="lower left")
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Comparison reports
# ---------------------------------------------------------------------------------------------------------------------
COLUMNS = ("backbone", "weights", "layer", "dataset", "concept_type", "seeds", "standard_top1", "standard_lo",
           "standard_hi", "chance", "chance_level", "iis", "iis_std", "iis_lo", "iis_hi", "iis_cc", "iis_cc_lo",
           "iis_cc_hi")
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
        row = {"backbone": m.get("backbone"), "weights": m.get("weights"), "layer": m.get("layer"),
               "dataset": m.get("dataset"), "concept_type": m.get("concept_type"), "seeds": len(s.get("seeds", [0])),
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


def write_table(rows, md_path, csv_path, comparisons=None):
    """report.csv: every column of ``rows`` as numbers; report.md: the same values laid out for reading (value ±
    std over seeds [interval]), chance-level runs marked, then the paired verdicts between neighbouring rows."""
    cols = list(COLUMNS) + list(FLOOR_COLUMNS) + [c for c in rows[0] if c not in COLUMNS + FLOOR_COLUMNS + VERSUS] + \
        [c for c in VERSUS if c in rows[0]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    ratio_cols = [c for c in cols if c.startswith("top1@")]
    head = ["backbone", "weights", "layer", "dataset", "concept_type", "seeds", "standard top-1 [95 %]",
            "IIS ± std over seeds [95 %]", "chance-corrected IIS [95 %]", "chance", "chance-level",
            "floor ± std over draws", "concept lift [95 % paired]"] + ratio_cols
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        iis_cell = _with_interval(r["iis"], r["iis_lo"], r["iis_hi"], r["iis_std"])
        if r["chance_level"] == "yes":
            iis_cell = f"**{iis_cell}** (chance-level)"
        cells = [r["backbone"], r["weights"], r["layer"], r["dataset"], r["concept_type"], r["seeds"],
                 _with_interval(r["standard_top1"], r["standard_lo"], r["standard_hi"]), iis_cell,
                 _with_interval(r["iis_cc"], r["iis_cc_lo"], r["iis_cc_hi"]), r["chance"], r["chance_level"],
                 _with_interval(r.get("floor"), None, None, r.get("floor_std")),
                 _with_interval(r.get("lift"), r.get("lift_lo"), r.get("lift_hi"))]
        md.append("| " + " | ".join(_cell(c) for c in cells + [r.get(c) for c in ratio_cols]) + " |")
    if comparisons:
        md += ["", "Paired comparisons of neighbouring rows (same val samples, same bootstrap resamples):", ""]
        for i, c in enumerate(comparisons):
            a, b = (f"row {i + 1} ({rows[i]['backbone']}@{rows[i]['layer']} {rows[i]['concept_type']})",
                    f"row {i + 2} ({rows[i + 1]['backbone']}@{rows[i + 1]['layer']} {rows[i + 1]['concept_type']})")
            md.append(f"* {a} vs {b}: " + (f"not compared: {c['reason']}" if "reason" in c else c["line"]))
    atomic_write_bytes(md_path, ("\n".join(md) + "\n").encode())


def correlations(x, y):
    """(Pearson r, Spearman rho) of two sequences; NaN when fewer than 3 points or no spread."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan"), float("nan")

    def rank(v):   # average ranks, so ties count equally
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):
            r[v == val] = r[v == val].mean()
        return r
    return float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(rank(x), rank(y))[0, 1])


def correlation_summary(rows):
    """Correlations of IIS with standard top-1 over the rows not flagged chance-level (a chance-level IIS is noise
    near the grid's width and would dominate them), with Fisher-z 95 % intervals. Returns a dict."""
    kept = [r for r in rows if r.get("chance_level") != "yes"]
    pearson, spearman = correlations([r["standard_top1"] for r in kept], [r["iis"] for r in kept])
    return {"n": len(kept), "left_out": len(rows) - len(kept), "pearson": pearson, "spearman": spearman,
            "pearson_interval": correlation_interval(pearson, len(kept)),
            "spearman_interval": correlation_interval(spearman, len(kept), spearman=True)}


def plot_scatter(rows, path):
    """IIS against standard top-1, one point per run (marker by concept type) with error bars (their bootstrap
    intervals); chance-level runs hollow and left out of the correlations, which carry Fisher-z intervals."""
    plt = pyplot()
    corr = correlation_summary(rows)
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
    for r in rows:
        ax.annotate(f"{r['backbone']}@{r['layer']}", (r["standard_top1"], r["iis"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")

    def ci(v):
        return "" if v[0] != v[0] else f" [{v[0]:.2f}, {v[1]:.2f}]"   # v != v: NaN, no interval
    left = f"; {corr['left_out']} chance-level left out" if corr["left_out"] else ""
    ax.set_title(f"IIS vs classifiability (n = {corr['n']}{left}; 95 % Fisher-z intervals)\n"
                 f"Pearson r = {corr['pearson']:.3f}{ci(corr['pearson_interval'])}, "
                 f"Spearman ρ = {corr['spearman']:.3f}{ci(corr['spearman_interval'])}", fontsize=9)
    ax.set_xlabel("standard top-1 (%)")
    ax.set_ylabel("IIS")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path), corr
