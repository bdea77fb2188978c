"""Shared parts of bench/concept_floor.py and bench/floor_planted.py: concept constructions, store entries,
the real trainer as a subprocess, the paired scorer, tables and the demo's inputs."""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

from utils import fileio, floor, stats, store
from utils.iis import load_predictions, score_with_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = ("iso", "mean", "matched", "shuffle", "rows")


# ---------------------------------------------------------------------------------------------------------------------
# Concept constructions: pure functions of arrays and a seeded generator
# ---------------------------------------------------------------------------------------------------------------------
def mean_cosine(v):
    """Mean pairwise cosine of the rows of ``v`` (diagonal excluded)."""
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    g = u @ u.T
    n = len(u)
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


def floor_vectors(kind, rng, k, emb, train_x):
    """K random directions of the given floor ``kind`` (module docstring)."""
    d = emb.shape[1]
    if kind in floor.KINDS:         # the trainer's own kinds, drawn by its generator
        return floor.directions(kind, rng, k, d, emb)
    mu = emb.mean(0)
    if kind == "mean":
        # cos(mu + s z_i, mu + s z_j) ~ |mu|^2 / (|mu|^2 + s^2 d): solve for the elements' mean cosine
        c = min(max(mean_cosine(emb), 1e-3), 0.999)
        s = np.linalg.norm(mu) * np.sqrt((1.0 / c - 1.0) / d)
        return mu + s * rng.standard_normal((k, d))
    if kind == "shuffle":
        return np.stack([emb[rng.integers(0, len(emb), k), j] for j in range(d)], 1)
    if kind == "rows":
        return np.asarray(train_x[np.sort(rng.choice(len(train_x), k, replace=False))])
    raise ValueError(f"unknown floor {kind!r}")


def centred(emb):
    """Element embeddings minus their mean: removes the direction they all share."""
    return emb - emb.mean(0)


def whitened(emb, eps=1e-3):
    """Centred embeddings with every principal direction of the library scaled to unit variance (ZCA within the
    elements' span; ``eps`` of the largest variance regularises the smallest)."""
    a = emb - emb.mean(0)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    var = s ** 2 / (len(a) - 1)
    return (u * (s / np.sqrt(var + eps * var.max()))) @ vt


def dedup_rows(emb, threshold):
    """Rows kept by a greedy pass (in row order) that drops any row whose cosine with a kept row exceeds
    ``threshold``."""
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    kept = []
    for i in range(len(u)):
        if not kept or (u[kept] @ u[i]).max() <= threshold:
            kept.append(i)
    return np.array(kept)


def background_share(library, index):
    """Per element: the share of its masked pixels (those not the fill value) that are dark (< 40 of 255). In
    Fashion-MNIST the background is black, so a segment with a high share is background, not garment."""
    from PIL import Image
    fill = index["key"]["params"]["fill"]
    out = []
    for e in index["elements"]:
        g = np.asarray(Image.open(os.path.join(library, e["file"])).convert("L"), dtype=np.int16)
        content = np.abs(g - fill) > 8
        out.append(float((g[content] < 40).mean()) if content.any() else 1.0)
    return np.array(out)


# ---------------------------------------------------------------------------------------------------------------------
# Store entries and the real trainer
# ---------------------------------------------------------------------------------------------------------------------
def short(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def concept_entry(work, name, vectors, labels, key, like):
    """Write (once) a concept store entry the trainer accepts in place of ``like`` (an element entry's meta): the
    same backbone key and classes, its own data key. Returns its path."""
    key = {"backbone": like["key"]["backbone"], "data": {"bench": "concept_floor", "variant": name, **key}}
    path = os.path.join(work, f"{name}_{short(key)}", "concepts")
    if not store.is_current(path, key):
        store.write(path, {"features": np.ascontiguousarray(vectors, dtype=np.float32),
                           "labels": np.asarray(labels, dtype=np.int64)},
                    key, {"classes": like["info"]["classes"]})
    return path


def train(features, concepts, concept_type="prototype", seeds=(0, 1, 2), n_concepts=200, extra=(), tag=""):
    """Run the trainer on ``features``/train, /val and the ``concepts`` entry; return its output folder (and the
    process's stderr, where tqdm reports each training loop's time)."""
    tag = f"{concept_type}_k{n_concepts}_s{'-'.join(map(str, seeds))}" + (f"_{short(list(extra))}" if extra else "") \
        + tag
    out = os.path.join(os.path.dirname(concepts), tag)
    cmd = [sys.executable, "-m", "IP_training.IP_Prototype_training", "--train_features",
           os.path.join(features, "train"), "--val_features", os.path.join(features, "val"), "--concepts", concepts,
           "--concept_type", concept_type, "--n_concepts", str(n_concepts), "--seeds", *map(str, seeds),
           "--floor_draws", "0", "--out", out, *extra]   # this bench draws its own floors (several kinds)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"error: the trainer failed on {concepts}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    if "up to date" not in p.stdout:
        print(f"  trained {os.path.relpath(out, REPO)} in {time.perf_counter() - t:.0f} s (standard probe "
              f"{loop_seconds(p.stderr, 'standard probe'):.0f} s, concept heads "
              f"{loop_seconds(p.stderr, 'concept heads'):.0f} s)", flush=True)
    train.stderr = p.stderr
    return out


class Scorer:
    """Scores runs with utils.iis/utils.stats on shared resamples, so any two of them pair."""

    def __init__(self, n_boot, seed):
        self.n_boot, self.seed, self.cache = n_boot, seed, {}

    def __call__(self, run):
        if run not in self.cache:
            res = fileio.read_json(os.path.join(run, "results.json"))
            s, p = score_with_stats(res, load_predictions(res, run), "top1", self.n_boot, self.seed)
            self.cache[run] = (s, p)
        return self.cache[run]

    def row(self, name, runs, floor_runs=None, base_runs=None):
        """A table row for the mean over ``runs`` (one run with several seeds, or several runs): IIS, its
        interval, the standard top-1, and, paired on the same resamples, the lift over the floor runs and the
        difference to the base runs."""
        iis, samples, std, acc = self._mean(runs)
        r = {"name": name, "iis": iis, "interval": list(stats.interval(samples)), "standard": std,
             "accuracies": acc, "n_val": self(runs[0])[0]["n_val"]}
        for label, other in (("lift", floor_runs), ("vs_base", base_runs)):
            if other:
                o_iis, o_samples, _, _ = self._mean(other)
                c = stats.compare(samples, o_samples, iis - o_iis, r["n_val"])
                r[label] = c
                if label == "lift":
                    r["floor"] = o_iis
                    per = [p["iis"] for x in other for p in self(x)[0]["per_seed"]]
                    r["floor_spread"] = float(np.std(per, ddof=1)) if len(per) > 1 else None
                    r["lift_seeds"] = self.two_way(runs, other, iis - o_iis, r["n_val"])
        return r

    def per_seed(self, runs):
        """(n_boot, S) bootstrap IIS of every seed of ``runs`` (seeds of several runs side by side), on the shared
        resamples."""
        out = []
        for run in runs:
            s, p = self(run)
            acc, chance = stats.bootstrap_accuracies(p["correct"], p["labels"], self.n_boot, self.seed)
            out.append(stats.curve_statistics(acc, p["rows"], s["ratios"], chance)["iis"])
        return np.concatenate(out, 1)

    def two_way(self, runs, floor_runs, observed, n_val):
        """The lift's interval with the val samples AND the (seed, floor draw) pairs resampled: each bootstrap
        resample also draws S of the S pairs with replacement (seed i of the concepts with draw i of the floor,
        which share initialisation, batch order and dev split), so the spread over seeds and draws is in it.
        None unless both sides have as many seeds."""
        a, b = self.per_seed(runs), self.per_seed(floor_runs)
        if a.shape != b.shape or a.shape[1] < 2:
            return None
        idx = np.random.default_rng([self.seed, 1]).integers(0, a.shape[1], a.shape)
        d = np.take_along_axis(a - b, idx, 1).mean(1)
        return stats.compare(d, np.zeros_like(d), observed, n_val)

    def _mean(self, runs):
        scored = [self(r) for r in runs]
        iis = float(np.mean([s["iis"] for s, _ in scored]))
        samples = np.mean([p["samples"]["iis"] for _, p in scored], 0)
        std = float(np.mean([s["standard_accuracy"] for s, _ in scored]))
        acc = np.mean([s["accuracies"] for s, _ in scored], 0).tolist()
        return iis, samples, std, acc


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------
def fmt_cmp(c):
    if not c:
        return ""
    p = c["p"]
    return f"{c['difference']:+.4f} [{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}] p={p:.3g}"


def table(title, rows, note=""):
    """Markdown table of rows from Scorer.row."""
    lines = [f"### {title}", ""] + ([note, ""] if note else [])
    lines += ["| concepts | IIS [95 %] | standard top-1 | top-1 at s = 0 / 0.9 / 0.98 | floor (± draws) | "
              "lift [95 % paired] | lift, seeds and draws resampled too | vs base [95 % paired] |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = "" if "floor" not in r else f"{r['floor']:.4f}" + (
            f" ± {r['floor_spread']:.4f}" if r.get("floor_spread") is not None else "")
        a = r["accuracies"]
        lines.append(f"| {r['name']} | {r['iis']:.4f} [{r['interval'][0]:.4f}, {r['interval'][1]:.4f}] | "
                     f"{r['standard']:.2f} | {a[0]:.1f} / {a[-3]:.1f} / {a[-1]:.1f} | {fl} | "
                     f"{fmt_cmp(r.get('lift'))} | {fmt_cmp(r.get('lift_seeds'))} | {fmt_cmp(r.get('vs_base'))} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    return text


# ---------------------------------------------------------------------------------------------------------------------
# The demo's inputs
# ---------------------------------------------------------------------------------------------------------------------
class Demo:
    """The demo's features, element embeddings and library, read once."""

    def __init__(self, args):
        self.args, self.features, self.work = args, args.features, args.work
        self.elements = os.path.join(args.features, args.elements)
        arrays, self.meta = store.read(self.elements)
        self.emb, self.labels = np.asarray(arrays["features"], np.float64), np.asarray(arrays["labels"])
        tr, self.train_meta = store.read(os.path.join(args.features, "train"))
        self.train_x, self.train_labels = np.asarray(tr["features"], np.float64), np.asarray(tr["labels"])
        self.n_classes = len(self.meta["info"]["classes"])
        self.inputs = {"elements": self.meta["key_hash"], "train": self.train_meta["key_hash"]}
        self._floors = {}

    def entry(self, name, vectors, labels=None, **key):
        labels = np.arange(len(vectors)) % self.n_classes if labels is None else labels
        return concept_entry(self.work, name, vectors, labels, {**key, "inputs": self.inputs}, self.meta)

    def run(self, entry, concept_type="prototype", seeds=(0, 1, 2), k=None, extra=()):
        return train(self.features, entry, concept_type, seeds, self.args.n_concepts if k is None else k, extra)

    def floor(self, kind="iso", k=None):
        """One run of the ``kind`` floor with K = ``k``: a pool of iid random directions (--pool x K rows; for
        'rows' every train row, labelled by its class) from which each seed's balanced selection draws its own K, so
        seeds 0 .. draws-1 are draws of K iid directions, paired with seeds 0 .. draws-1 of a concept run."""
        k = k or self.args.n_concepts
        if (kind, k) not in self._floors:
            rng = np.random.default_rng([FLOORS.index(kind), k, 7])
            if kind == "rows":
                v, lab = self.train_x, self.train_labels
            else:
                v, lab = floor_vectors(kind, rng, self.args.pool * k, self.emb, self.train_x), None
            entry = self.entry(f"floor-{kind}", v, lab, k=k, pool=self.args.pool)
            self._floors[(kind, k)] = [self.run(entry, seeds=tuple(range(self.args.draws)), k=k)]
        return self._floors[(kind, k)]

    def real(self, concept_type="prototype", extra=()):
        # the demo's own entry, trained in a folder under --work (never in the demo's outputs/runs)
        return self.run(self.entry("real", self.emb, self.labels), concept_type, extra=extra)

    def background(self):
        index = fileio.read_json(self.meta["info"]["elements_index"])
        return background_share(os.path.dirname(self.meta["info"]["elements_index"]), index)

    def element_library(self, fill=None, method="segments"):
        """The demo's element library cut again (the real stages: segment_extractor with another --fill, or
        patch_extractor's grid patches of the same images), embedded by the same backbone, in its own folder under
        --work; returns (entry, embeddings, labels)."""
        index = fileio.read_json(self.meta["info"]["elements_index"])
        k = index["key"]
        name = f"fill{k['params']['fill'] if fill is None else fill}" if method == "segments" else method
        lib = os.path.join(self.work, f"library_{name}")
        out = os.path.join(self.work, f"elements_{name}")
        py = [sys.executable, "-m"]
        cut = [*py, f"concept_extractor.{'segment' if method == 'segments' else 'patch'}_extractor", "--dataset",
               k["data"]["dataset"], "--data_root", self.args.data_root, "--images_per_class",
               str(k["images_per_class"]), "--seed", str(k["seed"]), "--out_dir", lib, "--workers", "2"]
        cut += ["--fill", str(fill)] if fill is not None else []
        for cmd in (cut, [*py, "concept_extractor.visual_element_emb_extractor", "--model_config",
                          self.meta["info"]["backbone"]["name"], "--elements", os.path.join(lib, method),
                          "--out", out]):
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"error: {' '.join(cmd[2:4])} failed:\n{p.stderr[-2000:]}")
        arrays, meta = store.read(out)
        if meta["key"]["backbone"] != self.meta["key"]["backbone"]:
            sys.exit(f"error: {out} was embedded with another backbone key than {self.elements}")
        return out, np.asarray(arrays["features"], np.float64), np.asarray(arrays["labels"])


def loop_seconds(stderr, desc):
    """Elapsed seconds of the last finished tqdm loop named ``desc`` in a trainer's stderr."""
    import re
    found = re.findall(desc + r": 100%[^\[]*\[(\d+):(\d+)(?::(\d+))?<", stderr.replace("\r", "\n"))
    if not found:
        return float("nan")
    a, b, c = found[-1]
    return float(int(a) * 3600 + int(b) * 60 + int(c)) if c else float(int(a) * 60 + int(b))
