r"""Do the trainer's results survive a change to the sweep's code? Runs the visual trainer on fixed workloads, saves
what it wrote, and compares with a saved run.

    python -m bench.sweep_regression --save /tmp/before.json      # on the old code
    python -m bench.sweep_regression --compare /tmp/before.json   # on the new: identical, or how far apart

Workload: bench_heads' generator at a small size (6 000 x 256 train, 1 500 val, 20 overlapping classes, 60 elements),
through ``IP_training.IP_Prototype_training.main``, in five configurations: --protocol reference in float32 and in
bfloat16, --protocol iis (holdout selection, 2 lrs), iis with two stacked seeds, and end2end concepts. Saved per
configuration: every results.json row, the IIS, and a digest of every array of predictions.npz and heads.pt.
Prints each configuration's verdict: identical (rows and digests), or the rows and fields that differ with the IIS of
both. Timing-free: run it anywhere.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import torch

from bench.profile_sweep import write_workload

WORKLOAD = dict(n_train=6000, n_val=1500, dim=256, n_classes=20, n_concepts=60)
CONFIGS = {
    "reference float32": ["--protocol", "reference", "--epochs", "12"],
    "reference bfloat16": ["--protocol", "reference", "--epochs", "12", "--precision", "bfloat16"],
    "iis (holdout, 2 lrs)": ["--protocol", "iis", "--epochs", "8"],
    "iis, seeds 0 1": ["--protocol", "iis", "--epochs", "5", "--seeds", "0", "1"],
    "end2end": ["--protocol", "iis", "--epochs", "4", "--concept_type", "end2end", "--n_concepts", "20",
                "--e2e_pool", "60"],
}
FIELDS = ("top1", "top5", "select_top1", "epoch", "train_loss", "val_loss", "diverged")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", help="write this run's results here (JSON)")
    g.add_argument("--compare", help="compare this run with a saved one")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "iis_sweep_regression"))
    p.add_argument("--only", nargs="+", default=None, choices=list(CONFIGS), help="these configurations only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2)")
    return p


def _digest(a):
    a = np.ascontiguousarray(a)
    return f"{a.dtype}{list(a.shape)}:" + hashlib.sha256(a.tobytes()).hexdigest()[:16]


def run_config(paths, out, extra):
    from IP_training import IP_Prototype_training as T
    from utils import iis
    argv = ["--train_features", paths["train"], "--val_features", paths["val"], "--concepts", paths["elements"],
            "--out", out, "--n_concepts", "0", "--device", "cpu", *extra]
    T.main(T.get_args_parser().parse_args(argv))
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    pred = np.load(os.path.join(out, "predictions.npz"), allow_pickle=False)
    heads = torch.load(os.path.join(out, "heads.pt"), weights_only=True)
    return {"runs": [{k: r.get(k) for k in ("head", "ratio", "lr", "seed") + FIELDS} for r in res["runs"]],
            "iis": iis.score(res)["iis"],
            "digests": {**{f"predictions.{k}": _digest(pred[k]) for k in pred.files},
                        **{f"heads.{k}": _digest(v.numpy()) for k, v in sorted(heads.items())}}}


def compare(name, old, new):
    if old["runs"] == new["runs"] and old["digests"] == new["digests"]:
        return f"{name}: identical ({len(new['runs'])} rows, {len(new['digests'])} arrays), IIS {new['iis']:.4f}"
    lines = [f"{name}: DIFFERENT, IIS {old['iis']:.4f} -> {new['iis']:.4f} ({new['iis'] - old['iis']:+.4f})"]
    for f in FIELDS:
        a = [r[f] for r in old["runs"]]
        b = [r[f] for r in new["runs"]]
        n = sum(x != y for x, y in zip(a, b))
        if n:
            d = max((abs(x - y) for x, y in zip(a, b) if x is not None and y is not None), default=float("nan"))
            lines.append(f"  {f}: {n} of {len(a)} rows differ, max |difference| {d:.6g}")
    arrays = [k for k in old["digests"] if old["digests"][k] != new["digests"].get(k)]
    if arrays:
        lines.append(f"  arrays differing: {', '.join(arrays)}")
    return "\n".join(lines)


def main(args):
    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))   # results should not depend on it
    os.makedirs(args.workdir, exist_ok=True)
    paths = write_workload(argparse.Namespace(workdir=args.workdir, **WORKLOAD), torch.device("cpu"))
    saved = None
    if args.compare:
        with open(args.compare) as f:
            saved = json.load(f)
    got, failed = {}, False
    for name, extra in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        out = os.path.join(args.workdir, f"out-{os.getpid()}-{len(got)}")
        got[name] = run_config(paths, out, extra)
        if saved is not None:
            if name not in saved:
                print(f"{name}: not in {args.compare}")
                continue
            verdict = compare(name, saved[name], got[name])
            failed |= "DIFFERENT" in verdict
            print(verdict, flush=True)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(got, f, indent=1)
        print(f"{len(got)} configurations -> {args.save}: " + ", ".join(f"{n} IIS {g['iis']:.4f}"
                                                                         for n, g in got.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
