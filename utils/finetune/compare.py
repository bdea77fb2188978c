"""The fine-tuning comparison table (scripts/finetune_compare.sh, IP_training/IP_finetune_compare.py), per concept set
(the training concepts, and the unseen ones): per arm and lambda, mean ± std over seeds of standard top-1, IIS and
top-1 at s = 0.1 and 0.9, with the paired difference to the plain arm; then, per seed, interp - plain on the same val
samples (paired bootstrap interval and p, utils/stats.compare on the runs' per-sample predictions), and over seeds
the mean ± sd of those differences with a t interval. Written as finetune_compare.md and finetune_compare.csv."""
import math
import os

import numpy as np

from .. import results, stats
from ..errors import UserError
from ..fileio import atomic_write_bytes
from ..iis import load_predictions, score_with_stats

TRAIN = "train"     # the concept set of a 4-field manifest line: the training concepts


def _mean_std(v):
    v = np.asarray(v, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _fmt(m, s, digits):
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def _run(arm, lam, seed, concepts, path):
    s = results.read_score(path)
    acc = dict(zip([round(r, 6) for r in s["ratios"]], s["accuracies"]))
    return dict(arm=arm, lam=float(lam) if lam not in ("", "-") else None, seed=seed, concepts=concepts, path=path,
                top1=float(s["standard_accuracy"]), iis=float(s["iis"]), s01=acc.get(0.1, float("nan")),
                s09=acc.get(0.9, float("nan")))


def comparison(manifest_rows):
    """Rows (arm, lambda, seed, run dir) of one concept set -> table rows, one per (arm, lambda): pretrained, plain,
    interp at each lambda, then any other arm name (e.g. a refresh-policy variant).

    Each run dir holds its default score, iis.json (iis_computing.py, as scripts/finetune_compare.sh runs it). Values: mean ± sample std over seeds of standard top-1, IIS,
    top-1 at s = 0.1 and 0.9; for every arm but pretrained and plain also the paired difference to the plain arm at
    the same seed, and in how many seeds it beats plain.
    """
    runs = [r if isinstance(r, dict) else _run(*r[:3], TRAIN, r[3]) for r in manifest_rows]
    plain = {r["seed"]: r for r in runs if r["arm"] == "plain"}
    groups = {}
    for r in runs:
        groups.setdefault((r["arm"], r["lam"]), []).append(r)
    order = sorted(groups, key=lambda g: ({"pretrained": 0, "plain": 1, "interp": 2}.get(g[0], 3), g[0], g[1] or 0))
    table = []
    for arm, lam in order:
        g = groups[(arm, lam)]
        row = dict(arm=arm, lambda_interp=lam, n=len(g), seeds=" ".join(str(r["seed"]) for r in g))
        for k in ("top1", "iis", "s01", "s09"):
            row[k] = _mean_std([r[k] for r in g])
        if arm not in ("pretrained", "plain"):
            pairs = [(r, plain[r["seed"]]) for r in g if r["seed"] in plain]
            row["d_top1"] = _mean_std([a["top1"] - b["top1"] for a, b in pairs])
            row["d_iis"] = _mean_std([a["iis"] - b["iis"] for a, b in pairs])
            row["wins"] = f"{sum(a['top1'] > b['top1'] for a, b in pairs)}/{len(pairs)}, " \
                          f"{sum(a['iis'] > b['iis'] for a, b in pairs)}/{len(pairs)}"
            row["pairs"] = pairs
        table.append(row)
    return table, runs


def _material(path, cache):
    """(scored, paired material) of the run at ``path`` from its results.json and predictions, or None without them."""
    if path not in cache:
        f = results.results_path(path)
        res = results.read(f) if os.path.isfile(f) else None
        preds = load_predictions(res, os.path.dirname(f)) if res is not None else None
        cache[path] = None if preds is None else score_with_stats(res, preds)
    return cache[path]


def paired_rows(table, cache):
    """Per interp-type row of ``table`` and seed: interp - plain in IIS and standard top-1 on the same val samples
    (paired bootstrap, utils/stats.compare); None for a pair whose runs kept no per-sample predictions."""
    out = []
    for row in table:
        for a, b in row.get("pairs", []):
            ma, mb = _material(a["path"], cache), _material(b["path"], cache)
            if ma is None or mb is None or ma[1]["samples"] is None or mb[1]["samples"] is None:
                out.append(dict(arm=a["arm"], lam=a["lam"], seed=a["seed"], iis=None, top1=None))
                continue
            (sa, pa), (sb, pb) = ma, mb
            if not np.array_equal(pa["labels"], pb["labels"]):
                raise UserError(f"{a['path']} and {b['path']} were scored on different val samples: interp and plain "
                                f"must be scored on the same subset")
            n, lv = len(pa["labels"]), sa["interval"]["level"]
            out.append(dict(arm=a["arm"], lam=a["lam"], seed=a["seed"],
                            iis=stats.compare(pa["samples"]["iis"], pb["samples"]["iis"], sa["iis"] - sb["iis"], n, lv),
                            top1=stats.compare(pa["samples"]["standard"], pb["samples"]["standard"],
                                               sa["standard_accuracy"] - sb["standard_accuracy"], n, lv)))
    return out


def _cmp(c, digits):
    if c is None:
        return "— (no predictions)"
    lo, hi = c["interval"]
    return f"{c['difference']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] p = {c['p']:.3g}"


def _over_seeds(vals, digits):
    m, sd, iv = stats.seed_interval(vals)
    if m is None:
        return "—"
    if sd is None:
        return f"{m:+.{digits}f}"
    return f"{m:+.{digits}f} ± {sd:.{digits}f} [{iv[0]:+.{digits}f}, {iv[1]:+.{digits}f}]"


def _signs(cs):
    cs = [c for c in cs if c is not None]
    up = sum(c["verdict"] == ">" for c in cs)
    down = sum(c["verdict"] == "<" for c in cs)
    return f"{up} up / {down} down of {len(cs)}"


def set_section(name, table, runs, paired):
    """Markdown lines and csv rows of one concept set."""
    head = ("| arm | λ | seeds | standard top-1 (%) | IIS | top-1 @ s=0.1 | top-1 @ s=0.9 | Δ top-1 vs plain | "
            "Δ IIS vs plain | interp > plain (top-1, IIS) |")
    md, csv = [f"### Concepts: {name}", "", head, "|" + "---|" * 10], []
    for r in table:
        lam = "" if r["lambda_interp"] is None else f"{r['lambda_interp']:g}"
        d1, di = r.get("d_top1", (float("nan"),) * 2), r.get("d_iis", (float("nan"),) * 2)
        md.append(f"| {r['arm']} | {lam or '—'} | {r['n']} | {_fmt(*r['top1'], 2)} | {_fmt(*r['iis'], 4)} | "
                  f"{_fmt(*r['s01'], 2)} | {_fmt(*r['s09'], 2)} | {_fmt(*d1, 2)} | {_fmt(*di, 4)} | "
                  f"{r.get('wins', '—')} |")
        vals = [*r["top1"], *r["iis"], *r["s01"], *r["s09"], *d1, *di]
        csv.append(",".join([name, r["arm"], lam, str(r["n"])] + ["" if math.isnan(v) else f"{v:.6g}" for v in vals]))
    if paired:
        md += ["", "Paired, interp − plain at the same seed on the same val samples (95 % paired bootstrap "
               "interval, p); then over seeds: mean ± sd [95 % t interval over seeds], and how many seeds differ "
               "detectably:", "",
               "| arm | λ | seed | Δ IIS [interval] p | Δ top-1 (points) [interval] p |", "|---|---|---|---|---|"]
        for p in paired:
            md.append(f"| {p['arm']} | {p['lam']:g} | {p['seed']} | {_cmp(p['iis'], 4)} | {_cmp(p['top1'], 2)} |")
        for arm, lam in dict.fromkeys((p["arm"], p["lam"]) for p in paired):
            g = [p for p in paired if (p["arm"], p["lam"]) == (arm, lam)]
            di = [p["iis"]["difference"] for p in g if p["iis"] is not None]
            d1 = [p["top1"]["difference"] for p in g if p["top1"] is not None]
            md.append(f"| {arm} | {lam:g} | over {len(g)} seeds | {_over_seeds(di, 4)}; "
                      f"{_signs(p['iis'] for p in g)} | {_over_seeds(d1, 2)}; {_signs(p['top1'] for p in g)} |")
    md += ["", "Per run:", "", "| arm | λ | seed | standard top-1 (%) | IIS | top-1 @ 0.1 | top-1 @ 0.9 |",
           "|---|---|---|---|---|---|---|"]
    for r in runs:
        lam = "" if r["lam"] is None else f"{r['lam']:g}"
        md.append(f"| {r['arm']} | {lam} | {r['seed']} | {r['top1']:.2f} | {r['iis']:.4f} | {r['s01']:.2f} | "
                  f"{r['s09']:.2f} |")
    return md + [""], csv


def headline(sets, paired):
    """One line per unseen concept set (else the training one) and interp arm: the claim's test."""
    names = [s for s in sets if not s.startswith(TRAIN)] or list(sets)[:1]
    out = []
    for name, arm, lam in dict.fromkeys((n, p["arm"], p["lam"]) for n in names for p in paired[n]):
        g = [p for p in paired[name][:] if (p["arm"], p["lam"]) == (arm, lam) and p["iis"] is not None]
        if not g:
            continue
        out.append(f"**Headline ({name} concepts), {arm} λ = {lam:g} − plain over {len(g)} seeds:** Δ IIS "
                   f"{_over_seeds([p['iis']['difference'] for p in g], 4)} ({_signs(p['iis'] for p in g)}), Δ top-1 "
                   f"{_over_seeds([p['top1']['difference'] for p in g], 2)} points ({_signs(p['top1'] for p in g)})")
    return out


def read_manifest(manifest):
    """Lines (arm, lambda, seed[, concept set], run folder): a line without a set is of the training concepts."""
    with open(manifest) as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    for i, r in enumerate(rows):
        if len(r) not in (4, 5):
            raise UserError(f"{manifest}: line {i + 1} has {len(r)} tab-separated fields, expected 4 or 5 (arm, "
                            f"lambda, seed, [concept set,] run folder)")
    return [r if len(r) == 5 else [*r[:3], TRAIN, r[3]] for r in rows]


def write_comparison(manifest, out_dir):
    """Read the tab-separated manifest, write finetune_compare.md/.csv; returns {concept set: table rows}."""
    rows = read_manifest(manifest)
    sets = list(dict.fromkeys(sorted((r[3] for r in rows), key=lambda s: (not s.startswith(TRAIN), s))))
    md, tables, paired, cache = [], {}, {}, {}
    csv = ["concepts,arm,lambda,n_seeds,top1_mean,top1_std,iis_mean,iis_std,top1_s0.1_mean,top1_s0.1_std,"
           "top1_s0.9_mean,top1_s0.9_std,d_top1_mean,d_top1_std,d_iis_mean,d_iis_std"]
    for name in sets:
        table, runs = comparison([_run(*r) for r in rows if r[3] == name])
        tables[name], paired[name] = table, paired_rows(table, cache)
        lines, c = set_section(name, table, runs, paired[name])
        md += lines
        csv += c
    md = headline(sets, paired) + [""] + md if any(paired.values()) else md
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "finetune_compare.md"), ("\n".join(md).rstrip() + "\n").encode())
    atomic_write_bytes(os.path.join(out_dir, "finetune_compare.csv"), ("\n".join(csv) + "\n").encode())
    print("\n".join(md))
    return tables
