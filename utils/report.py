"""Figures and tables from scored results."""
import os

from .store import atomic_write_bytes


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(scored, path, title="Accuracy kept under sparsity"):
    """One PNG: accuracy / standard accuracy against sparsity ratio, one line per scored run, IIS in the legend."""
    import io
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
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return os.path.abspath(path)
