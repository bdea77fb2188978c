"""Compute the Inherent Interpretability Score from training results, print it, write iis.json and plot the curve.

    python iis_computing.py outputs/runs/fashion_mnist/efficientnet_lite0/prototype_segments

IIS = trapezoid-rule area of (top-1 at sparsity s / standard top-1) over the sparsity grid. Per seed, each ratio's
top-1 is that of the head (lr) with the best selection accuracy and the standard top-1 that of the best linear probe;
diverged heads never count. The IIS printed is the mean over seeds, ± their standard deviation, with a 95 % bootstrap
interval over the val samples (--bootstrap resamples, from the per-sample predictions the trainers keep), and next to
it the chance-corrected IIS (every accuracy taken above the majority-class rate of the val labels). A run whose
standard top-1 is not above chance by its own interval is flagged chance-level: its IIS measures noise.
When the trainer also trained the random-concept floor (--floor_draws), each run gets a line with its floor IIS and
its concept lift = IIS - floor with a paired 95 % interval (iis.json "floor"; what it means: docs/validity.md).
A score is keyed by the flags that change it (--metric, --bootstrap, --bootstrap_seed): with the defaults it is the
run's iis.json and iis_curve.png; with any other it is written beside them as iis_<hash>.json and iis_curve_<hash>.png
(the settings recorded inside, utils/layout.score_names), so rescoring a run another way never overwrites a score.

Is A more interpretable than B? A paired bootstrap on the same val samples, with a p-value and a verdict:

    python iis_computing.py RUN_A RUN_B --compare

Given several results folders, prints them side by side and overlays their curves in one plot; with --report DIR
also writes a comparison report:

    python iis_computing.py outputs/runs/fashion_mnist/*/* --report outputs/reports/fashion_mnist

DIR/report.md and DIR/report.csv (backbone, weights, layer, dataset, concept type, seeds, standard top-1, IIS ± std
over seeds, intervals, chance level and flag, chance-corrected IIS, top-1 at each ratio, and the paired verdict of
each row against the next), DIR/curves.png (every curve overlaid, with bands) and DIR/scatter.png (IIS against
standard top-1 with error bars, chance-level runs hollow and left out of the Pearson and Spearman correlations, whose
95 % intervals are given over runs (Fisher z) and over val samples (the same paired resamples for every run)).
"""
import argparse
import glob
import os

import numpy as np

from utils import cli, compat, floor, layout, results, stats
from utils.errors import UserError
from utils.fileio import atomic_write_json, publish_dir
from utils.iis import data_flags, load_predictions, score_with_stats
from utils.report import correlation_summary, corr_line, plot_curves, plot_scatter, table_rows, write_table


REPORT_FILES = ("report.md", "report.csv", "curves.png", "scatter.png")


def default_results():
    """Without arguments (as the original's iis_computing.py is run): the runs of the default output folders, or
    outputs/runs itself when there are none, so the error names where runs were looked for."""
    root = os.path.dirname(os.path.abspath(__file__))
    found = [f for d in ("outputs/runs", "IP_training")
             for f in sorted(glob.glob(os.path.join(root, d, "**", "results.json"), recursive=True))]
    return [os.path.dirname(f) for f in found] or [os.path.join(root, "outputs", "runs")]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*",
                   help="results.json files or the folders holding them (default: every run under outputs/runs/, "
                        "where the runners put them, and under IP_training/, where the original README's commands do)")
    p.add_argument("--metric", default="top1", choices=["top1", "top5"], help="accuracy used for the curve")
    p.add_argument("--plot", default=None,
                   help="PNG path of the combined plot (default: iis_curve.png beside a single results file, "
                        "iis_compare.png in the folder common to several)")
    p.add_argument("--report", default=None, help="folder for the comparison report (table, curves, scatter)")
    add_stats_args(p)
    return p


def add_stats_args(p):
    g = p.add_argument_group("intervals and comparison")
    g.add_argument("--bootstrap", type=int, default=stats.N_BOOT, metavar="N",
                   help="bootstrap resamples of the val samples for the 95%% intervals and paired tests (0: none)")
    g.add_argument("--bootstrap_seed", type=int, default=0,
                   help="seed of the resamples; runs on the same val samples share them, which pairs them")
    g.add_argument("--compare", action="store_true",
                   help="with exactly two runs A B: is IIS(A) different from IIS(B)? paired bootstrap interval, "
                        "two-sided p-value and a verdict; refused for runs on different val samples")
    return g


def weights_label(meta):
    """``ft:<8 hex of the checkpoint's bytes>`` for a local checkpoint (its folder's name once the file is gone), else
    the weights' name."""
    w = meta.get("weights") or ""
    if not os.path.isabs(w):
        return w
    tag = layout.weights_tag(w) if os.path.isfile(w) else ""
    return f"ft:{tag[3:11]}" if tag.startswith("ft-") else f"ft:{os.path.basename(os.path.dirname(w))}"


def label_of(meta):
    """A run's label: backbone@layer, a checkpoint's ``ft:<8 hex>`` (so a fine-tuned backbone never reads as the
    pretrained one), the concept type."""
    w = weights_label(meta)
    return f"{meta.get('backbone')}@{meta.get('layer')}{' ' + w if w.startswith('ft:') else ''} " \
           f"{meta.get('concept_type')}"


def score_settings(args):
    """The flags that change a score's content (utils/layout.SCORE_DEFAULTS): they name the file it is written to."""
    return {"metric": args.metric, "bootstrap": args.bootstrap, "bootstrap_seed": args.bootstrap_seed}


def score_path(path, args):
    """Score one results file or folder: (label, scored dict as written to iis.json, results, paired material). A
    score with other than the default settings records them (``score_settings``); the default one is as it was."""
    f = results.results_path(path)
    res = results.read(f)
    preds = load_predictions(res, os.path.dirname(f))
    s, paired = score_with_stats(res, preds, args.metric, args.bootstrap, args.bootstrap_seed)
    s["floor"] = floor.score(res, preds, s, paired, args.metric, args.bootstrap, args.bootstrap_seed)
    s.update(results=os.path.abspath(f), meta={k: res["meta"].get(k) for k in (
        "backbone", "weights", "layer", "dataset", "concept_type", "n_concepts", "n_train", "n_val", "select_on",
        "protocol", "val_samples")})
    s["meta"].update(classes=len(res["meta"].get("classes") or []) or None, weights_label=weights_label(res["meta"]))
    s["flags"] = [{"code": c, "line": line} for c, line in data_flags(res, s)]
    if layout.score_settings(**score_settings(args)):
        s["score_settings"] = score_settings(args)
    return label_of(res["meta"]), s, paired


def not_comparable(a, b, name_a="A", name_b="B"):
    """Why two scored runs cannot be compared pair-wise, or None when they can."""
    (_, sa, pa), (_, sb, pb) = a, b
    for name, s, p in ((name_a, sa, pa), (name_b, sb, pb)):
        if p is None:
            return (f"{name} has no per-sample predictions (results written before they were kept)"
                    if s["metric"] == "top1" else "paired comparisons need --metric top1 (the predictions are top-1)")
        if p["samples"] is None:
            return "the bootstrap is off (--bootstrap 0)"
    va, vb = sa["meta"].get("val_samples"), sb["meta"].get("val_samples")
    if va is None or vb is None:
        missing = name_a if va is None else name_b
        return f"{missing} does not record which val samples it was scored on (meta.val_samples)"
    if va != vb or not np.array_equal(pa["labels"], pb["labels"]):
        return f"{name_a} and {name_b} were scored on different val samples (val_samples {va} vs {vb})"
    return None


def paired(a, b):
    """Paired comparison of two comparable scored runs. Both were bootstrapped with the same seed on the same val
    samples, so resample j is the same draw for both and the difference of their samples is the paired bootstrap
    (tests check it equals stats.paired_bootstrap, which stacks both runs' heads explicitly)."""
    (_, sa, pa), (_, sb, pb) = a, b
    return stats.compare(pa["samples"]["iis"], pb["samples"]["iis"], sa["iis"] - sb["iis"], len(pa["labels"]),
                         sa["interval"]["level"])


def mixed_val_sets(scored):
    """A sentence when the runs were scored on different val sets (their numbers are not paired and no correlation
    or single figure compares them without saying so), else None."""
    sets = {}
    for _, s in scored:
        m = s["meta"]
        sets.setdefault(m.get("val_samples"), set()).add(f"{m.get('dataset')} n_val {m.get('n_val')}")
    if len(sets) < 2:
        return None
    which = "; ".join(sorted(", ".join(sorted(v)) for v in sets.values()))
    return (f"these runs were scored on {len(sets)} different val sets ({which}): their IIS are not paired, and no "
            f"correlation is taken across them")


def fmt_interval(v, nd=4):
    return f"[{v[0]:.{nd}f}, {v[1]:.{nd}f}]"


def summary_lines(lbl, s):
    """What to say about one run beyond the table: flag, note."""
    out = []
    if s.get("chance_level"):
        m = (s.get("interval") or {}).get("margin")
        why = (f"standard - chance in {fmt_interval(m, 2)} points" if m else "at or below it")
        out.append(f"chance-level: {lbl}: standard top-1 {s['standard_accuracy']:.2f} % is not above chance "
                   f"(majority class, {s['chance']:.2f} %) by its own interval ({why}): its IIS measures noise, "
                   f"not interpretability")
    for f in s.get("flags") or []:
        out.append(f"flag ({f['code']}): {lbl}: {f['line']}")
    if s.get("note"):
        out.append(f"note: {lbl}: {s['note']}")
    out += [f"warning: {lbl}: {w}" for w in s.get("warnings") or []]
    return out


def lift_lines(scored):
    """The concept-lift line of every run that has a floor."""
    return [floor.lift_line(lbl, s["floor"]) for lbl, s in scored if s.get("floor")]


def headline(s):
    seeds = len(s["seeds"])
    spread = f" ± {s['iis_std']:.4f} (std over {seeds} seeds)" if s["iis_std"] is not None else " (1 seed: no spread)"
    out = f"IIS = {s['iis']:.4f}{spread}"
    iv = s.get("interval")
    if iv:
        out += (f", {100 * iv['level']:g} % bootstrap interval {fmt_interval(iv['iis'])} "
                f"({iv['resamples']} resamples of {s['n_val']} val samples)")
    if s.get("iis_chance_corrected") is not None:
        out += f"; chance-corrected IIS {s['iis_chance_corrected']:.4f}" + (
            f" {fmt_interval(iv['iis_chance_corrected'])}" if iv else "") + f" (chance {s['chance']:.2f} %)"
    return out


def print_table(scored, metric):
    """One table with named columns: row number, run, n val, standard accuracy, IIS (± std over seeds when any run has
    several), its interval, the chance-corrected IIS, and the normalised accuracy (top-1 at s / standard top-1) at
    each ratio s; a star marks a chance-level run, a ! a flagged one."""
    ratios = scored[0][1]["ratios"]
    seeds = any(s["iis_std"] is not None for _, s in scored)
    head = ["#", "run", "n val", f"standard {metric} %", "IIS", *(["± seeds"] if seeds else []), "95 % interval",
            "chance-corrected"] + [f"s={r:g}" for r in ratios] + [""]
    body = []
    for i, (lbl, s) in enumerate(scored):
        iv = (s.get("interval") or {}).get("iis")
        cc = s.get("iis_chance_corrected")
        cells = [str(i + 1), lbl, str(s["meta"].get("n_val") or "–"), f"{s['standard_accuracy']:.2f}",
                 f"{s['iis']:.4f}"]
        if seeds:
            cells.append("–" if s["iis_std"] is None else f"{s['iis_std']:.4f}")
        cells += [fmt_interval(iv) if iv else "–", "–" if cc is None else f"{cc:.4f}"]
        cells += [f"{n:.3f}" for n in s["normalised"]]
        body.append(cells + [("*" if s.get("chance_level") else "") + ("!" if s.get("flags") else "")])
    width = [max(len(r[j]) for r in [head] + body) for j in range(len(head))]
    print(f"s=...: normalised accuracy, {metric} at sparsity s / standard {metric}; * chance-level, ! flagged "
          f"(lines below)")
    for r in [head] + body:
        print("  ".join(c.ljust(w) if j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(r, width))).rstrip())


def row_lines(scored):
    """The closing lines: each row named, with its data and its headline numbers."""
    out = []
    for i, (lbl, s) in enumerate(scored):
        m = s["meta"]
        out.append(f"row {i + 1} = {lbl} on {m.get('dataset')} (n_train {m.get('n_train')}, n_val {m.get('n_val')}, "
                   f"chosen on {m.get('select_on')}): {headline(s)}")
    return out


def main(args):
    args.results = args.results or default_results()
    if args.compare and len(args.results) != 2:
        raise UserError(f"--compare takes exactly two runs (A B), got {len(args.results)}; "
                            f"--report gives the paired verdicts between neighbouring rows of many")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 (no interval) or a number of resamples, got {args.bootstrap}")
    entries = [score_path(p, args) for p in args.results]
    if args.compare:   # refuse before writing anything, so a refused comparison leaves no half-done outputs
        reason = not_comparable(*entries)
        if reason:
            raise UserError(f"cannot compare: {reason}")
    scored = [(lbl, s) for lbl, s, _ in entries]
    score_name, curve_name = layout.score_names(**score_settings(args))   # other settings: other files, beside
    for lbl, s in scored:
        out_dir = os.path.dirname(s["results"])
        atomic_write_json(os.path.join(out_dir, score_name), s)
        if len(scored) > 1:
            plot_curves([(lbl, s)], os.path.join(out_dir, curve_name))
    # outputs go only where asked: beside a single run, or to --plot / --report (never a folder common to many)
    plot = args.plot or (os.path.join(os.path.dirname(scored[0][1]["results"]), curve_name)
                         if len(scored) == 1 else None)
    caveat = mixed_val_sets(scored)
    if plot:
        plot = plot_curves(scored, plot, caveat=caveat)
    print_table(scored, args.metric)
    for lbl, s in scored:
        for line in summary_lines(lbl, s):
            print(line)
    for line in lift_lines(scored):
        print(line)
    if caveat:
        print(f"note: {caveat}")
    for line in row_lines(scored):
        print(line)
    if plot:
        print(f"curve: {plot}")
    elif not args.report:
        print(f"curves: each run's {curve_name}; give --plot PNG or --report DIR for one plot of all")
    if args.compare:
        c = paired(*entries)
        print(f"A = {scored[0][0]}\nB = {scored[1][0]}")
        line = stats.verdict_line(c, "A", "B", seeds=f"{len(scored[0][1]['seeds'])} + {len(scored[1][1]['seeds'])}")
        flagged = [n for n, (_, s) in zip("AB", scored) if s.get("chance_level")]
        print(line + (f"; {' and '.join(flagged)} chance-level: its IIS is noise" if flagged else ""))
    if args.report:
        comparisons = []
        for i in range(len(entries) - 1):
            reason = not_comparable(entries[i], entries[i + 1], f"row {i + 1}", f"row {i + 2}")
            if reason:
                comparisons.append({"reason": reason})
            else:
                c = paired(entries[i], entries[i + 1])
                line = stats.verdict_line(c, f"row {i + 1}", f"row {i + 2}")
                flagged = [f"row {j + 1}" for j in (i, i + 1) if scored[j][1].get("chance_level")]
                if flagged:   # a difference to a chance-level IIS is real but says nothing about interpretability
                    line += f"; {' and '.join(flagged)} chance-level: its IIS is noise"
                comparisons.append(dict(c, line=line))
        rows = table_rows(scored, comparisons)
        corr = correlation_summary(rows, [(p or {}).get("samples") for _, _, p in entries])   # paired resamples
        with publish_dir(args.report, REPORT_FILES) as rep:     # all its files, or the old report untouched
            write_table(rows, os.path.join(rep, "report.md"), os.path.join(rep, "report.csv"), comparisons,
                        corr=corr, notes=[caveat] if caveat else [])
            plot_curves(scored, os.path.join(rep, "curves.png"), caveat=caveat)
            scatter = plot_scatter(rows, os.path.join(rep, "scatter.png"), corr)
        print(f"report: {os.path.abspath(args.report)}/report.md, report.csv, curves.png"
              f"{', scatter.png' if scatter else ' (no scatter: ' + corr['no_scatter'] + ')'}")
        print(f"IIS vs standard top-1: {corr_line(corr)}")
        for i, c in enumerate(comparisons):
            print(f"row {i + 1} vs row {i + 2}: " + (f"not compared: {c['reason']}" if "reason" in c else c["line"]))


if __name__ == "__main__":
    cli.run(main, get_args_parser(), dialect=compat.dialect(__file__))
