r"""Probe study (issue 17 item 2): the project's standard probe against one trained to convergence, as the IIS's
denominator, on four workloads.

    python -m bench.probe_study                          # all four workloads -> bench/results/probe_study.md
    python -m bench.probe_study --workloads separable bench
    python -m bench.probe_study --workloads planted --validity_config ci

Workloads: ``separable`` — three classes whose means lie 8 standard deviations apart in 16-d (300 train / 150 val),
every feature offset by 10 sd (as post-ReLU features sit far from 0); ``offset`` — the same with the offset at 100 sd;
``bench`` — bench/bench_heads.py's overlapping 100-class features at 10 000 x 1024 / 2 500 (200 concepts = noisy train
rows); ``demo`` — the demo's EfficientNet-Lite0 Fashion-MNIST features and runs (``bash scripts/demo.sh`` first);
``planted`` — the validity suite's representations (bench/validity.py; its work folder is reused).

Every run is the real trainer's (``python -m IP_training.IP_Prototype_training``, the project's protocol), scored by
``iis_computing.py``. Since the converged probe (utils/probe.py) became the project protocol's standard probe, the
run's own probe ("project probe" below) is that one for runs trained since, and the original's Adam probe for
``--protocol reference`` runs and runs trained before. For each run the study then fits, on the same train rows (the
trainer's dev split held out), the converged probe and, for comparison, the Adam probe on standardised features, and
recomputes the IIS with each as the denominator: same concept heads, same val samples and bootstrap resamples
(utils/stats.py), so the change of IIS has a paired interval. Also: which concept heads beat each probe by more than
their paired interval, the time of each probe fit (measured in the same process, back to back) and, for the scale
series, whether the standard accuracy then stays put.
"""
import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from bench import validity
from utils.probe import ConvergedProbes, fit_converged_probe, standardiser
from utils.results import read_score

REPO = validity.REPO
WORKLOADS = ("separable", "offset", "bench", "demo", "demo_standardised", "planted")
DEMO = os.path.join(REPO, "outputs", "features", "fashion_mnist", "efficientnet_lite0")
DEMO_RUNS = os.path.join(REPO, "outputs", "runs", "fashion_mnist", "efficientnet_lite0")
STUDY_VERSION = 1   # bump when what a cached probe fit means changes


# ---------------------------------------------------------------------------------------------------------------------
# Workloads as store entries + trainer runs
# ---------------------------------------------------------------------------------------------------------------------
def _write(folder, name, x, y, xv, yv, emb, emb_labels, n_classes):
    from utils import store
    spec = dict(name=name, source="synthetic", arch=name, weights="none", layer="x", pooling="none", layout="nchw")
    classes = [f"c{i}" for i in range(n_classes)]
    for split, (f, lab) in (("train", (x, y)), ("val", (xv, yv))):
        store.write(os.path.join(folder, split), {"features": np.asarray(f, np.float32),
                                                  "labels": np.asarray(lab, np.int64), "indices": np.arange(len(lab))},
                    {"schema": 1, "backbone": spec, "data": {"dataset": name, "split": split}, "dtype": "float32"},
                    {"classes": classes, "dataset": name, "split": split, "backbone": spec})
    store.write(os.path.join(folder, "elements"), {"features": np.asarray(emb, np.float32),
                                                   "labels": np.asarray(emb_labels, np.int64)},
                {"schema": 1, "backbone": spec, "data": {"elements": name}, "dtype": "float32"},
                {"classes": classes, "backbone": spec})


def separable(offset, seed=0, dim=16, n=300, n_val=150, sd=1.0, gap=8.0):
    """Three classes, means ``gap`` sd apart (a regular simplex in a random 3-d subspace), every feature + offset sd;
    elements: 4 noisy copies of each class mean (12 concepts)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:3]
    means = gap / np.sqrt(2) * basis                                   # |m_i - m_j| = gap
    def split(m):
        y = rng.integers(0, 3, m)
        return offset + sd * (means[y] + rng.normal(size=(m, dim))), y
    x, y = split(n)
    xv, yv = split(n_val)
    el_y = np.repeat(np.arange(3), 4)
    emb = offset + sd * (means[el_y] + 0.3 * rng.normal(size=(12, dim)))
    return x, y, xv, yv, emb, el_y


def bench_workload(n_train=10000, n_val=2500, dim=1024, n_classes=100, n_concepts=200):
    from bench.bench_heads import synthetic
    x, y, xv, yv, concepts = synthetic(n_train, n_val, dim, n_classes, n_concepts)
    # the rows synthetic() copied its concepts from (its own draw, repeated), so the elements carry their labels
    pick = torch.randperm(n_train, generator=torch.Generator().manual_seed(1))[:n_concepts]
    return x.numpy(), y.numpy(), xv.numpy(), yv.numpy(), concepts.numpy(), y[pick].numpy()


def train_runs(work, workload, concept_types=("prototype",)):
    """{run label: (run dir, train entry, val entry)} for a synthetic workload, training what is missing."""
    entries = os.path.join(work, "entries", workload)
    if workload in ("separable", "offset"):
        data = separable(10.0 if workload == "separable" else 100.0)
        n_classes, n_concepts = 3, 0
    else:
        data = bench_workload()
        n_classes, n_concepts = 100, 200
    _write(entries, workload, *data, n_classes)
    jobs, runs = [], {}
    for ct in concept_types:
        out = os.path.join(work, "runs", workload, ct)
        k = n_concepts if ct == "prototype" else min(n_concepts or 12, 12 if workload != "bench" else 200)
        jobs.append((f"{workload} {ct}", validity.train_command(entries, out, ct, k, ())))
        runs[f"{workload} {ct}"] = (out, os.path.join(entries, "train"), os.path.join(entries, "val"))
    validity.run_all(jobs, 2, "train", os.path.join(work, "logs"))
    return runs


def demo_runs():
    if not os.path.isdir(DEMO_RUNS):
        raise validity.SuiteError(f"no demo runs at {DEMO_RUNS}: run `bash scripts/demo.sh` first")
    return {f"demo {ct}": (os.path.join(DEMO_RUNS, f"{ct}_segments"), os.path.join(DEMO, "train"),
                           os.path.join(DEMO, "val")) for ct in ("prototype", "cluster", "end2end")
            if os.path.isdir(os.path.join(DEMO_RUNS, f"{ct}_segments"))}


def demo_standardised_runs(work):
    """The demo's Prototype and Cluster runs again, on its features and element embeddings standardised with the train
    features' mean and standard deviation: should the concept heads see standardised features too? The val entry
    keeps its data key, so iis_computing pairs these runs with the demo's."""
    from utils import store
    runs, jobs = {}, []
    if not os.path.isdir(DEMO_RUNS):
        raise validity.SuiteError(f"no demo runs at {DEMO_RUNS}: run `bash scripts/demo.sh` first")
    tr, mtr = store.read(os.path.join(DEMO, "train"))
    mean = np.asarray(tr["features"], np.float64).mean(0)
    sd = np.asarray(tr["features"], np.float64).std(0)
    sd = np.where(sd > 0, sd, 1.0)
    entries = os.path.join(work, "entries", "demo_standardised")
    for name in ("train", "val", "elements_segments"):
        arrays, meta = store.read(os.path.join(DEMO, name))
        key = dict(meta["key"], backbone=dict(meta["key"]["backbone"], standardised="train mean/std"))
        out = {k: np.array(v) for k, v in arrays.items()}
        out["features"] = ((out["features"] - mean) / sd).astype(np.float32)
        store.write(os.path.join(entries, name), out, key, meta["info"])
    for ct in ("prototype", "cluster"):
        with open(os.path.join(DEMO_RUNS, f"{ct}_segments", "results.json")) as f:
            k = json.load(f)["key"]
        out = os.path.join(work, "runs", "demo_standardised", ct)
        flags = ("--seeds", *map(str, k["seeds"]), "--concept_selection", k.get("concept_selection", "balanced"))
        jobs.append((f"demo_standardised {ct}", validity.train_command(entries, out, ct, k["n_concepts"], flags,
                                                                       elements="elements_segments")))
        runs[f"demo standardised {ct}"] = (out, os.path.join(entries, "train"), os.path.join(entries, "val"))
    validity.run_all(jobs, 2, "train", os.path.join(work, "logs"))
    return runs


def planted_runs(config):
    """The validity suite's runs (curve and scale series, every concept type), trained where missing."""
    suite = validity.CONFIGS[config]
    work = os.path.join(REPO, "outputs", "validity", f"{config}-{suite.key_id()}")
    from bench import planted
    lat = planted.latent(suite.data)
    curve, scaled = validity.representations(suite)
    reps = {r.name: r for r in curve + scaled}
    jobs, runs = [], {}
    for rep in reps.values():
        entries = os.path.join(work, "entries", rep.name)
        validity.write_entries(entries, rep, suite.data, lat)
    for ct in suite.concept_types:
        for rep in reps.values():
            entries = os.path.join(work, "entries", rep.name)
            out = os.path.join(work, "runs", ct, rep.name)
            jobs.append((f"{ct} {rep.name}", validity.train_command(entries, out, ct, dict(suite.n_concepts)[ct],
                                                                    suite.trainer_flags)))
            runs[f"planted {ct} {rep.name}"] = (out, os.path.join(entries, "train"), os.path.join(entries, "val"))
    validity.run_all(jobs, 2, "train", os.path.join(work, "logs"))
    return runs


# ---------------------------------------------------------------------------------------------------------------------
# One run: the two probes, the IIS with each denominator
# ---------------------------------------------------------------------------------------------------------------------
def scored(run, n_boot):
    r = subprocess.run([sys.executable, "iis_computing.py", run, "--bootstrap", str(n_boot)], cwd=REPO,
                       env=validity._env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise validity.SuiteError(f"iis_computing.py {run}: {r.stderr.strip()[-500:]}")
    return read_score(run, bootstrap=n_boot)


def adam_probe(x, y, xv, yv, split, lrs, epochs, batch_size):
    """The project's standard probe (utils/heads.py's Adam sweep over ``lrs``) on ``x``: the val predictions of the
    lr with the best dev top-1 (ties: the lower lr), as utils/iis.py picks."""
    from utils.heads import LinearProbes, fit
    probes = LinearProbes(x.shape[1], int(y.max()) + 1, len(lrs), [split.seed] * len(lrs))
    res = fit(probes, lrs, x, y, xv, yv, epochs=epochs, batch_size=batch_size, splits=[split], desc="adam probe")
    best = max(range(len(lrs)), key=lambda h: (res["select_top1"][h], -lrs[h]))
    return res["pred"][best]


def _top1(pred, y):
    return 100.0 * float(np.mean(np.asarray(pred) == np.asarray(y)))


def _source_id():
    with open(os.path.join(REPO, "utils", "probe.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


class ProbeCache:
    """Val predictions of every probe fit, one .npz per fit under ``folder``, keyed by everything that determines it
    (the train and val entries' keys and array digests, the split, the probe and its settings, the source of
    utils/probe.py): the demo's three runs share one set of fits, and an interrupted study resumes. The
    recorded seconds are those of the fit that made the file."""

    def __init__(self, folder, train_entry, val_entry):
        from utils import store
        self.folder = folder
        self.base = {"train": _entry_id(store, train_entry), "val": _entry_id(store, val_entry),
                     "probe_source": _source_id(), "version": STUDY_VERSION}

    def get(self, what, fit, **settings):
        """``fit()`` -> (pred, info dict) run once per (what, settings); returns (pred, info, seconds)."""
        blob = json.dumps(dict(self.base, what=what, **settings), sort_keys=True, default=float)
        path = os.path.join(self.folder, f"{what}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz")
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as z:
                return z["pred"], json.loads(str(z["info"])), float(z["seconds"])
        t0 = time.perf_counter()
        pred, info = fit()
        seconds = time.perf_counter() - t0
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, pred=np.asarray(pred), info=np.array(json.dumps(info)), seconds=np.array(seconds),
                 key=np.array(blob))
        os.replace(tmp, path)
        return np.asarray(pred), info, seconds


def _beats(correct, sel, n_boot):
    """How many chosen concept heads beat their seed's standard probe by more than their paired interval."""
    from utils import stats
    return int((stats.beats_standard(correct, sel, n_boot)[1] > 0).sum())


def _entry_id(store, path):
    meta = store.read_meta(path)
    if not meta:
        raise validity.SuiteError(f"{path}: not a store entry (no meta.json)")
    return {"key_hash": meta.get("key_hash"), "digests": meta.get("digests")}


def study(label, run, train_entry, val_entry, n_boot, cache_dir, scales=(1.0,)):
    """One row per (seed of the run) summarised: accuracies, IIS before/after with paired intervals, flags, times."""
    from utils import stats, store
    from utils.sweep import make_splits
    sc = scored(run, n_boot)
    with open(os.path.join(run, "results.json")) as f:
        res = json.load(f)
    key = res["key"]
    tr, _ = store.read(train_entry)
    va, _ = store.read(val_entry)
    x, y = torch.as_tensor(np.array(tr["features"])), torch.as_tensor(np.array(tr["labels"]))
    xv, yv = torch.as_tensor(np.array(va["features"])), torch.as_tensor(np.array(va["labels"]))
    with np.load(os.path.join(run, res["predictions"]), allow_pickle=False) as z:
        pred, labels = z["pred"], z["labels"]
    n_classes = len(res["meta"]["classes"])
    out = dict(label=label, n_train=len(y), n_val=len(yv), dim=x.shape[1], n_classes=n_classes,
               concept_type=res["meta"]["concept_type"], iis_before=sc["iis"],
               iis_before_iv=sc["interval"]["iis"], standard_before=sc["standard_accuracy"])
    rows = np.array([p["pred_rows"] for p in sc["per_seed"]])
    correct_heads = pred[rows[:, 1:].ravel()] == labels[None]            # chosen heads, seed-major
    n_r = rows.shape[1] - 1
    probes = {"converged": [], "adam_std": []}
    times = {"adam": 0.0, "adam_std": 0.0, "converged": 0.0}
    scale_top1 = {}
    cache = ProbeCache(cache_dir, train_entry, val_entry)
    adam_settings = dict(lrs=key["lrs"], epochs=key["epochs"], batch_size=key["batch_size"])

    def adam(k=1.0, std=False):
        def fit():
            xs, xvs = x * k, xv * k
            if std:
                mean, sd = standardiser(xs[split.train])
                xs, xvs = (xs - mean) / sd, (xvs - mean) / sd
            return adam_probe(xs, y, xvs, yv, split, key["lrs"], key["epochs"], key["batch_size"]), {}
        return cache.get("adam_std" if std else "adam", fit, seed=seed, holdout=fraction, scale=k, **adam_settings)

    def converged(k=1.0):
        def fit():
            xs = (x * k).double()
            p = fit_converged_probe(xs[split.train], y[split.train], xs[split.dev], y[split.dev], n_classes)
            with torch.no_grad():
                pred = ConvergedProbes([p])(xv * k)[0].argmax(1)
            return pred.numpy(), dict(weight_decay=p["weight_decay"], converged=p["converged"], path=p["path"])
        return cache.get("converged", fit, seed=seed, holdout=fraction, scale=k)

    fraction = key.get("holdout_fraction") or 0.1
    for seed in sc["seeds"]:
        split = make_splits(y.numpy(), [seed], "holdout", fraction)[0]
        times["adam"] += adam()[2]
        pred_std, _, secs = adam(std=True)
        probes["adam_std"].append(pred_std)
        times["adam_std"] += secs
        pred_c, info, secs = converged()
        times["converged"] += secs
        probes["converged"].append(pred_c)
        out.setdefault("weight_decay", []).append(info["weight_decay"])
        out.setdefault("converged_flag", []).append(info["converged"])
        out.setdefault("solver_iterations", []).append(sum(s["iterations"] for s in info["path"]))
        for k in scales:
            if k != 1.0:
                scale_top1.setdefault(("converged", k), []).append(_top1(converged(k)[0], yv))
                if x.numel() <= 1e6:   # the Adam probe's scale dependence is the suite's subject; here the cheap ones
                    scale_top1.setdefault(("adam", k), []).append(_top1(adam(k)[0], yv))
    out["times"] = times
    out["scale_top1"] = {f"{m} x{k:g}": float(np.mean(v)) for (m, k), v in scale_top1.items()}
    ratios = sc["ratios"]
    # "before": the trainer's own probe rows; "after": each seed's new probe in its place; same resamples
    base_correct = np.concatenate([pred[rows[:, 0]] == labels[None], correct_heads])
    n_s = len(rows)
    sel = np.array([[s] + [n_s + s * n_r + j for j in range(n_r)] for s in range(n_s)])
    before, before_samples = stats.run_statistics(base_correct, sel, ratios, labels, n_boot, 0)
    out["chance"] = before["chance"]
    out["iis_cc_before"] = before["iis_chance_corrected"]
    out["beats_before"] = _beats(base_correct, sel, n_boot)
    for name, preds in probes.items():
        pc = np.stack([p == labels for p in preds])
        correct = np.concatenate([pc, correct_heads])
        after, samples = stats.run_statistics(correct, sel, ratios, labels, n_boot, 0)
        lo, hi = stats.interval(samples["iis"] - before_samples["iis"])
        out[name] = dict(standard=after["standard_accuracy"], standard_iv=after["standard_accuracy_interval"],
                         iis=after["iis"], iis_iv=after["iis_interval"], iis_cc=after["iis_chance_corrected"],
                         delta=after["iis"] - before["iis"], delta_iv=[float(lo), float(hi)],
                         beats=_beats(correct, sel, n_boot))
    out["n_heads"] = n_s * n_r
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def _iv(v, iv, nd=4):
    return f"{v:.{nd}f} [{iv[0]:.{nd}f}, {iv[1]:.{nd}f}]"


def table(rows):
    head = ["run", "n train / val, dim, classes", "standard top-1: project probe", "Adam on standardised",
            "converged (wd)", "IIS: project probe", "IIS: converged", "Δ IIS [95 % paired]",
            "chance-corr. IIS: project → converged", "heads beating the probe: project / converged",
            "probe fit s: project / Adam-std / converged"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c, a = r["converged"], r["adam_std"]
        t = r["times"]
        md.append("| " + " | ".join([
            r["label"], f"{r['n_train']} / {r['n_val']}, {r['dim']}, {r['n_classes']}",
            f"{r['standard_before']:.2f}", f"{a['standard']:.2f}",
            f"{c['standard']:.2f} ({', '.join(f'{w:g}' for w in r['weight_decay'])})",
            _iv(r["iis_before"], r["iis_before_iv"]), _iv(c["iis"], c["iis_iv"]), _iv(c["delta"], c["delta_iv"]),
            f"{r['iis_cc_before']:.4f} → {c['iis_cc']:.4f}", f"{r['beats_before']} / {c['beats']} of {r['n_heads']}",
            f"{t['adam']:.1f} / {t['adam_std']:.1f} / {t['converged']:.1f}"]) + " |")
    return md


def planted_summary(rows):
    """Lines on the validity suite's properties with each denominator, per concept type (planted workload)."""
    types = {}
    for r in rows:
        if r["label"].startswith("planted "):
            _, ct, rep = r["label"].split(" ")
            types.setdefault(ct, {})[rep] = r
    out = []
    for ct, by in types.items():
        shares = sorted((k for k in by if k.startswith("share") and "x" not in k), key=lambda k: float(k[5:]))
        scales = sorted((k for k in by if "x" in k), key=lambda k: float(k.split("x")[1]))
        for name, get in (("project probe", lambda r: r["iis_before"]),
                          ("converged probe", lambda r: r["converged"]["iis"])):
            curve = [get(by[k]) for k in shares]
            mono = all(a > b for a, b in zip(curve, curve[1:]))
            ctrl = get(by["control"]) if "control" in by else float("nan")
            base = scales[0].split("x")[0] if scales else shares[len(shares) // 2]
            sc = {k.split("x")[1]: get(by[k]) for k in scales}
            change = max(sc.values(), key=lambda v: abs(v - get(by[base])), default=float("nan")) - get(by[base])
            std = [by[k]["standard_before"] if name == "project probe" else by[k]["converged"]["standard"]
                   for k in [base] + scales]
            out.append(f"* {ct}, {name}: IIS over the shares {', '.join(f'{v:.4f}' for v in curve)} "
                       f"({'falling at every step' if mono else 'NOT monotone'}); control {ctrl:.4f}"
                       f" ({'below every share < 1' if all(ctrl < v for v in curve[:-1]) else 'NOT last'}); "
                       f"{base} at x1 {get(by[base]):.4f}, " + ", ".join(f"x{k} {v:.4f}" for k, v in sc.items()) +
                       f" (largest change {change:+.4f}; standard top-1 " +
                       " / ".join(f"{v:.2f}" for v in std) + " % at x1 / " +
                       " / ".join(f"x{k.split('x')[1]}" for k in scales) + ")")
    return out


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--validity_config", default="full", choices=sorted(validity.CONFIGS),
                   help="which validity-suite configuration the planted workload reuses")
    p.add_argument("--work", default=os.path.join(REPO, "outputs", "probe_study"), help="work folder")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "probe_study.md"),
                   help="markdown table (and a .json of every figure beside it)")
    return p


def main(args):
    torch.manual_seed(0)
    t0 = time.perf_counter()
    importlib.import_module("torch._dynamo")   # the first torch.optim optimiser of a process imports it: once
    startup = time.perf_counter() - t0
    rows = []
    for w in args.workloads:
        if w == "demo":
            runs = demo_runs()
        elif w == "planted":
            runs = planted_runs(args.validity_config)
        elif w == "demo_standardised":
            runs = demo_standardised_runs(args.work)
        else:
            runs = train_runs(args.work, w, ("prototype",) if w == "bench" else ("prototype", "cluster"))
        for label, (run, tr, va) in runs.items():
            scales = (0.1, 1.0, 10.0) if w != "planted" or label.endswith("share0.50") else (1.0,)
            r = study(label, run, tr, va, args.bootstrap, os.path.join(args.work, "probes"), scales)
            rows.append(r)
            c = r["converged"]
            print(f"{label}: standard top-1 {r['standard_before']:.2f} -> {c['standard']:.2f} % (Adam on "
                  f"standardised {r['adam_std']['standard']:.2f}); IIS {r['iis_before']:.4f} -> {c['iis']:.4f} "
                  f"(delta {c['delta']:+.4f} [{c['delta_iv'][0]:+.4f}, {c['delta_iv'][1]:+.4f}]); heads beating "
                  f"the probe {r['beats_before']} -> {c['beats']} of {r['n_heads']}; "
                  f"{r['scale_top1']}; fit s {r['times']}", flush=True)
    md = ["# Probe study (issue 17 item 2)", "", f"`python -m bench.probe_study --workloads {' '.join(args.workloads)}`"
          f" ({args.bootstrap} bootstrap resamples). Times are seconds on a shared, loaded 2-core machine: compare "
          f"within a row only; the first torch.optim optimiser of a process also imports torch._dynamo, "
          f"{startup:.1f} s once here, left out of the rows.", ""] + table(rows)
    summary = planted_summary(rows)
    if summary:
        md += ["", "Planted suite (Prototype) with each denominator:", ""] + summary
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    validity.publish({args.out: ("\n".join(md) + "\n").encode(),
                      args.out[:-3] + ".json": json.dumps(rows, indent=1, default=float).encode()})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except validity.SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
