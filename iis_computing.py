"""Compute the Inherent Interpretability Score from training results, print it, write iis.json and plot the curve.

    python iis_computing.py outputs/runs/fashion_mnist/efficientnet_lite0/prototype_segments

IIS = trapezoid-rule area of (top-1 at sparsity s / standard top-1) over the sparsity grid, where each ratio's top-1
is the best over the lr grid and the standard top-1 is the best linear probe. Given several results folders, prints
them side by side and overlays their curves in one plot; with --report DIR also writes a comparison report:

    python iis_computing.py outputs/runs/fashion_mnist/*/* --report outputs/reports/fashion_mnist

DIR/report.md and DIR/report.csv (backbone, weights, layer, dataset, concept type, standard top-1, IIS, top-1 at each
ratio), DIR/curves.png (every curve overlaid) and DIR/scatter.png (IIS against standard top-1, with Pearson and
Spearman correlations).
"""
import argparse
import glob
import os

from utils import cli
from utils.iis import score
from utils.report import plot_curves, plot_scatter, table_rows, write_table
from utils.store import atomic_write_json, read_json


def default_results():
    """Without arguments (as the original's iis_computing.py is run): the runs of the default output folders, or
    outputs/runs itself when there are none, so the error names where runs were looked for."""
    root = os.path.dirname(os.path.abspath(__file__))
    found = [f for d in ("outputs/runs", "IP_training")
             for f in sorted(glob.glob(os.path.join(root, d, "**", "results.json"), recursive=True))]
    return [os.path.dirname(f) for f in found] or [os.path.join(root, "outputs", "runs")]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", default=default_results(),
                   help="results.json files or the folders holding them (default: every run under outputs/runs/, "
                        "where the runners put them, and under IP_training/, where the original README's commands do)")
    p.add_argument("--metric", default="top1", choices=["top1", "top5"], help="accuracy used for the curve")
    p.add_argument("--plot", default=None,
                   help="PNG path of the combined plot (default: iis_curve.png beside a single results file, "
                        "iis_compare.png in the folder common to several)")
    p.add_argument("--report", default=None, help="folder for the comparison report (table, curves, scatter)")
    return p


def label_of(meta):
    return f"{meta.get('backbone')}@{meta.get('layer')} {meta.get('concept_type')}"


def main(args):
    scored = []
    for path in args.results:
        f = os.path.join(path, "results.json") if os.path.isdir(path) else path
        if not os.path.isfile(f):
            raise cli.UserError(f"no results.json at {path}: run IP_training first")
        res = read_json(f)
        if "runs" not in res:
            raise cli.UserError(f"{f} is not a results file (no 'runs')")
        s = score(res, args.metric)
        s.update(results=os.path.abspath(f), meta={k: res["meta"].get(k) for k in (
            "backbone", "weights", "layer", "dataset", "concept_type", "n_concepts", "n_train", "n_val")})
        out_dir = os.path.dirname(f)
        atomic_write_json(os.path.join(out_dir, "iis.json"), s)
        if len(args.results) > 1:
            plot_curves([(label_of(res["meta"]), s)], os.path.join(out_dir, "iis_curve.png"))
        scored.append((label_of(res["meta"]), s))
    dirs = [os.path.dirname(s["results"]) for _, s in scored]
    plot = args.plot or (os.path.join(dirs[0], "iis_curve.png") if len(dirs) == 1 else
                         os.path.join(os.path.commonpath(dirs), "iis_compare.png"))
    plot = plot_curves(scored, plot)
    width = max(len(lbl) for lbl, _ in scored)
    print(f"{'run':<{width}}  {'standard ' + args.metric:>13}  {'IIS':>6}  " +
          "  ".join(f"s={r:g}" for r in scored[0][1]["ratios"]))
    for lbl, s in scored:
        print(f"{lbl:<{width}}  {s['standard_accuracy']:>12.2f}%  {s['iis']:>6.4f}  " +
              "  ".join(f"{a:>{len(f's={r:g}')}.1f}" for r, a in zip(s["ratios"], s["accuracies"])))
    print(f"IIS = {scored[0][1]['iis']:.4f}" + (" (first run)" if len(scored) > 1 else ""))
    print(f"curve: {plot}")
    if args.report:
        rows = table_rows(scored)
        write_table(rows, os.path.join(args.report, "report.md"), os.path.join(args.report, "report.csv"))
        plot_curves(scored, os.path.join(args.report, "curves.png"))
        _, pearson, spearman = plot_scatter(rows, os.path.join(args.report, "scatter.png"))
        print(f"report: {os.path.abspath(args.report)}/report.md, report.csv, curves.png, scatter.png "
              f"(IIS vs standard top-1: Pearson {pearson:.3f}, Spearman {spearman:.3f})")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
