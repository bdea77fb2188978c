"""The fine-tuning comparison table (scripts/finetune_compare.sh, IP_training/IP_finetune_compare.py): per arm and
lambda, mean ± std over seeds of standard top-1, IIS and top-1 at s = 0.1 and 0.9, with the paired difference to the
plain arm, as finetune_compare.md and finetune_compare.csv."""
import math
import os

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_bytes
from ..results import read_score


def _mean_std(v):
    v = np.asarray(v, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _fmt(m, s, digits):
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def comparison(manifest_rows):
    """Rows (arm, lambda, seed, run dir) -> table rows, one per (arm, lambda): pretrained, plain, interp at each
    lambda, then any other arm name (e.g. a refresh-policy variant).

    Each run dir holds its default score, iis.json (iis_computing.py, as scripts/finetune_compare.sh runs it). Values: mean ± sample std over seeds of standard top-1, IIS,
    top-1 at s = 0.1 and 0.9; for every arm but pretrained and plain also the paired difference to the plain arm at
    the same seed, and in how many seeds it beats plain.
    """
    runs = []
    for arm, lam, seed, path in manifest_rows:
        s = read_score(path)
        acc = dict(zip([round(r, 6) for r in s["ratios"]], s["accuracies"]))
        runs.append(dict(arm=arm, lam=float(lam) if lam not in ("", "-") else None, seed=seed,
                         top1=float(s["standard_accuracy"]), iis=float(s["iis"]), s01=acc.get(0.1, float("nan")),
                         s09=acc.get(0.9, float("nan"))))
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
        table.append(row)
    return table, runs


def write_comparison(manifest, out_dir):
    """Read the tab-separated manifest (arm, lambda, seed, run dir per line), write finetune_compare.md/.csv."""
    with open(manifest) as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    for i, r in enumerate(rows):
        if len(r) != 4:
            raise UserError(f"{manifest}: line {i + 1} has {len(r)} tab-separated fields, expected 4 (arm, lambda, "
                            f"seed, run folder)")
    table, runs = comparison(rows)
    head = ("| arm | λ | seeds | standard top-1 (%) | IIS | top-1 @ s=0.1 | top-1 @ s=0.9 | Δ top-1 vs plain | "
            "Δ IIS vs plain | interp > plain (top-1, IIS) |")
    md = [head, "|" + "---|" * 10]
    csv = ["arm,lambda,n_seeds,top1_mean,top1_std,iis_mean,iis_std,top1_s0.1_mean,top1_s0.1_std,top1_s0.9_mean,"
           "top1_s0.9_std,d_top1_mean,d_top1_std,d_iis_mean,d_iis_std"]
    for r in table:
        lam = "" if r["lambda_interp"] is None else f"{r['lambda_interp']:g}"
        d1, di = r.get("d_top1", (float("nan"),) * 2), r.get("d_iis", (float("nan"),) * 2)
        md.append(f"| {r['arm']} | {lam or '—'} | {r['n']} | {_fmt(*r['top1'], 2)} | {_fmt(*r['iis'], 4)} | "
                  f"{_fmt(*r['s01'], 2)} | {_fmt(*r['s09'], 2)} | {_fmt(*d1, 2)} | {_fmt(*di, 4)} | "
                  f"{r.get('wins', '—')} |")
        vals = [*r["top1"], *r["iis"], *r["s01"], *r["s09"], *d1, *di]
        csv.append(",".join([r["arm"], lam, str(r["n"])] + ["" if math.isnan(v) else f"{v:.6g}" for v in vals]))
    per_run = ["", "Per run:", "", "| arm | λ | seed | standard top-1 (%) | IIS | top-1 @ 0.1 | top-1 @ 0.9 |",
               "|---|---|---|---|---|---|---|"]
    for r in runs:
        lam = "" if r["lam"] is None else f"{r['lam']:g}"
        per_run.append(f"| {r['arm']} | {lam} | {r['seed']} | {r['top1']:.2f} | {r['iis']:.4f} | {r['s01']:.2f} | "
                       f"{r['s09']:.2f} |")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "finetune_compare.md"), ("\n".join(md + per_run) + "\n").encode())
    atomic_write_bytes(os.path.join(out_dir, "finetune_compare.csv"), ("\n".join(csv) + "\n").encode())
    print("\n".join(md))
    return table

