"""Figures and tables from scored results."""
import os

from .store import atomic_write_bytes


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return os.path.abspath(path)


def plot_curves(scored, path, title="Accuracy kept under sparsity"):
    """One PNG: accuracy / standard accuracy against sparsity ratio, one line per scored run, IIS in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, s in scored:
        ax.plot(s["ratios"], s["normalised"], marker="o", label=f"{label}  (IIS {s['iis']:.3f})")
        if len(scored) == 1:
            ax.fill_between(s["ratios"], s["normalised"], alpha=0.15)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("sparsity ratio s (fraction of concepts zeroed per sample)")
    ax.set_ylabel("top-1 at s / standard top-1")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(1.05, max(max(s["normalised"]) for _, s in scored) + 0.05))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(scored) > 6 else 8, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Comparison reports
# ---------------------------------------------------------------------------------------------------------------------
COLUMNS = ("backbone", "weights", "layer", "dataset", "concept_type", "standard_top1", "iis")


def table_rows(scored):
    """One dict per scored run: the identifying columns, standard top-1, IIS and top-1 at each ratio."""
    rows = []
    for _, s in scored:
        m = s["meta"]
        row = {"backbone": m.get("backbone"), "weights": m.get("weights"), "layer": m.get("layer"),
               "dataset": m.get("dataset"), "concept_type": m.get("concept_type"),
               "standard_top1": round(s["standard_accuracy"], 2), "iis": round(s["iis"], 4)}
        row.update({f"top1@{r:g}": round(a, 2) for r, a in zip(s["ratios"], s["accuracies"])})
        rows.append(row)
    return rows


def write_table(rows, md_path, csv_path):
    import csv
    import io
    cols = list(COLUMNS) + [c for c in rows[0] if c not in COLUMNS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    atomic_write_bytes(md_path, ("\n".join(md) + "\n").encode())


def correlations(x, y):
    """(Pearson r, Spearman rho) of two sequences; NaN when fewer than 3 points or no spread."""
    import numpy as np
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


def plot_scatter(rows, path):
    """IIS against standard top-1, one point per run (marker by concept type), correlations in the title."""
    plt = _pyplot()
    x, y = [r["standard_top1"] for r in rows], [r["iis"] for r in rows]
    pearson, spearman = correlations(x, y)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    markers = dict(zip(sorted({r["concept_type"] for r in rows}), "osD^vP*X"))
    for ct, mk in markers.items():
        pts = [r for r in rows if r["concept_type"] == ct]
        ax.scatter([r["standard_top1"] for r in pts], [r["iis"] for r in pts], marker=mk, s=45, label=ct)
    for r in rows:
        ax.annotate(f"{r['backbone']}@{r['layer']}", (r["standard_top1"], r["iis"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("standard top-1 (%)")
    ax.set_ylabel("IIS")
    ax.set_title(f"IIS vs classifiability: Pearson r = {pearson:.3f}, Spearman ρ = {spearman:.3f}  (n = {len(rows)})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path), pearson, spearman
