r"""Validity suite: does the IIS rank planted representations the way their construction says it must?

    python -m bench.validity                       # full configuration: bench/results/validity.md + validity.png
    python -m bench.validity --config ci           # the small one tests/test_validity.py runs (a few minutes)
    python -m bench.validity --config ci --work /tmp/v --results_dir /tmp/v/results

Representations (bench/planted.py): the same samples written with a growing planted share of their class information
on directions that are not concepts (share 0, 0.25, ..., 1), a random control (share 0 seen in a random basis, the
concept library unchanged: as classifiable, no relation to the concepts), and share 0.5 with its features (and element
embeddings) multiplied by 0.1 and by 10. Each is written as the store entries the extractors write (train, val,
element embeddings) and scored as a user scores a backbone: ``python -m IP_training.IP_Prototype_training`` for every
concept type (Prototype, Cluster, End-to-end), then ``python iis_computing.py RUNS --report DIR``, whose paired
bootstrap verdicts between neighbouring rows (the project's own statistics) decide the orderings.

Properties checked, each one line PASS or FAIL (exit 1 when any fails):

* monotone: IIS falls at every step of the share, for every concept type; each step a paired verdict "> next"
  (p < 0.05 over val samples); the chance-corrected IIS falls at every step too (point estimates).
* control last: the random control's IIS is below every share < 1 and not above share 1 by a paired verdict (it is
  the same as share 1 in distribution, so a tie is the planted answer).
* scale: x0.1 and x10 give the IIS of x1 (paired verdict "no detectable difference" and |difference| <= 0.005).
* agree: the concept types order the shares identically (Kendall tau 1 between every two).
* workload: every standard top-1 is well below 100 % (<= 92 %) and well above chance, so accuracies can move.

Outputs: the markdown table and figure (``--results_dir``, published together: both written aside, then renamed), the
work folder (``--work``, default ``outputs/validity/<config>-<key>``: entries, runs, reports; keyed by the
configuration, so a rerun skips the finished trainings).
"""
import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from bench import planted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPT_TYPES = ("prototype", "cluster", "end2end")


@dataclass(frozen=True)
class Suite:
    data: planted.Planted = field(default_factory=planted.Planted)
    shares: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    scale_share: float = 0.5
    scales: tuple = (0.1, 10.0)
    concept_types: tuple = CONCEPT_TYPES
    # concepts per type: Prototype takes element embeddings (several per concept: redundancy, as real libraries
    # have), Cluster and End-to-end make as many concepts as were planted
    n_concepts: tuple = (("prototype", 32), ("cluster", 16), ("end2end", 16))
    trainer_flags: tuple = ()          # anything else for IP_Prototype_training (default: the project's protocol)
    bootstrap: int = 1000
    scale_tolerance: float = 0.005
    max_standard_top1: float = 92.0

    def key(self):
        d = asdict(self)
        d["data"] = self.data.key()
        return d

    def key_id(self):
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:10]


CONFIGS = {
    "full": Suite(data=planted.Planted(n_train=6000, n_val=3000)),
    "ci": Suite(data=planted.Planted(dim=32, n_concepts=8, n_classes=6, per_class=2, elements_per_concept=3,
                                     n_train=1500, n_val=1200, noise=0.45),
                shares=(0.0, 0.5, 1.0), concept_types=("prototype", "cluster", "end2end"),
                n_concepts=(("prototype", 16), ("cluster", 8), ("end2end", 8)), trainer_flags=("--epochs", "20"),
                bootstrap=500),
}


class SuiteError(Exception):
    """A step of the suite could not run (a trainer or the scorer failed): exit 2 with its message."""


# ---------------------------------------------------------------------------------------------------------------------
# Representations -> store entries
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rep:
    name: str
    share: float
    scale: float = 1.0
    rotate: bool = False


def representations(suite):
    """The curve (shares then the control) and the scale series (x0.1, x1, x10 at ``scale_share``), as Rep lists."""
    def name(share, scale=1.0):
        return f"share{share:.2f}" + ("" if scale == 1.0 else f"x{scale:g}")
    curve = [Rep(name(s), s) for s in suite.shares] + [Rep("control", 0.0, rotate=True)]
    base = Rep(name(suite.scale_share), suite.scale_share)
    scaled = sorted([base] + [Rep(name(suite.scale_share, k), suite.scale_share, k) for k in suite.scales],
                    key=lambda r: r.scale)
    return curve, scaled


def write_entries(folder, rep, p, lat):
    """train/, val/, elements/ store entries of ``rep``, keyed and described as the extractors key and describe
    theirs (backbone = the representation, data = the planted samples: every representation shares the data key, so
    iis_computing pairs them)."""
    from utils import store
    classes = [f"class{c}" for c in range(p.n_classes)]
    spec = dict(name="planted", source="planted", arch="planted", weights="none", layer=rep.name, pooling="none",
                layout="nchw")
    backbone = dict(spec, representation=asdict(rep), generator=p.key())
    content = planted.content_id(p)
    for split in ("train", "val"):
        x = planted.features(p, lat, split, rep.share, rep.scale, rep.rotate)
        y = planted.labels(lat, split)
        store.write(os.path.join(folder, split), {"features": x, "labels": y, "indices": np.arange(len(y))},
                    {"schema": 1, "backbone": backbone, "data": {"dataset": "planted", "split": split,
                                                                 "content": content}, "dtype": "float32"},
                    {"classes": classes, "dataset": "planted", "split": split, "backbone": spec})
    emb, emb_labels = planted.elements(lat, rep.scale)
    store.write(os.path.join(folder, "elements"), {"features": emb, "labels": emb_labels},
                {"schema": 1, "backbone": backbone, "data": {"elements": content}, "dtype": "float32"},
                {"classes": classes, "backbone": spec})


# ---------------------------------------------------------------------------------------------------------------------
# The project's CLIs
# ---------------------------------------------------------------------------------------------------------------------
def _env():
    # one thread per job: the jobs run side by side, and a fixed thread count keeps the sums bit-for-bit repeatable
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)


def train_command(entries, out, concept_type, n_concepts, flags, elements="elements"):
    """The trainer's command line for the entries ``entries``/{train, val, ``elements``}."""
    return [sys.executable, "-m", "IP_training.IP_Prototype_training",
            "--train_features", os.path.join(entries, "train"), "--val_features", os.path.join(entries, "val"),
            "--concepts", os.path.join(entries, elements), "--concept_type", concept_type,
            "--n_concepts", str(n_concepts), "--out", out, *flags]


def run_all(commands, jobs, what, logs):
    """Run (label, argv) pairs, ``jobs`` at a time, each into its own log file under ``logs``, printing one line as
    each ends; SuiteError on the first failure (the others are stopped)."""
    os.makedirs(logs, exist_ok=True)
    pending, running, total = list(commands), [], len(commands)
    done = 0
    while pending or running:
        while pending and len(running) < jobs:
            label, argv = pending.pop(0)
            log = os.path.join(logs, label.replace(" ", "_") + ".log")
            with open(log, "w") as f:
                running.append((label, log, subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=f,
                                                             stderr=subprocess.STDOUT)))
        label, log, proc = running.pop(0)
        proc.wait()
        done += 1
        with open(log, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()]
        if proc.returncode != 0:
            for _, _, other in running:
                other.kill()
                other.wait()
            raise SuiteError(f"{what} {label} failed (exit {proc.returncode}; log {log}):\n" + "\n".join(lines[-5:]))
        print(f"[{done}/{total}] {what} {label}: {lines[-1].split(' -> ')[0][-160:] if lines else ''}", flush=True)


def score(runs, report_dir, bootstrap):
    """``iis_computing.py RUNS --report report_dir``; the rows of its report.csv, in ``runs`` order."""
    argv = [sys.executable, "iis_computing.py", *runs, "--report", report_dir, "--bootstrap", str(bootstrap)]
    r = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SuiteError(f"iis_computing.py over {report_dir} failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
    with open(os.path.join(report_dir, "report.csv")) as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(runs):
        raise SuiteError(f"{report_dir}/report.csv has {len(rows)} rows for {len(runs)} runs")
    return [{k: _num(v) for k, v in r.items()} for r in rows]


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None if v == "" else v


# ---------------------------------------------------------------------------------------------------------------------
# The properties
# ---------------------------------------------------------------------------------------------------------------------
def _pair(a, b, row):
    return (f"IIS {a} {row['iis']:.4f} vs {b}: difference {row['vs_next_diff']:+.4f} "
            f"[{row['vs_next_lo']:+.4f}, {row['vs_next_hi']:+.4f}], p = {row['vs_next_p']:.3g}")


def kendall_tau(a, b):
    """Kendall's tau-a of two equally long sequences (no ties expected)."""
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return float(s / (n * (n - 1) / 2))


def check(suite, curve, scaled, tables):
    """[(property, concept type or 'all', ok, line)] from the scored tables: ``tables[ct] = (curve rows, scale
    rows)``, rows in the order of ``curve`` and ``scaled``."""
    out = []
    n_share = len(suite.shares)
    for ct, (rows, srows) in tables.items():
        names = [r.name for r in curve]
        for i in range(n_share - 1):
            row = rows[i]
            ok = row["vs_next"] == "> next"
            out.append(("monotone", ct, ok, f"{names[i]} > {names[i + 1]}: {_pair(names[i], names[i + 1], row)}"))
        cc = [r["iis_cc"] for r in rows[:n_share]]
        ok = all(a > b for a, b in zip(cc, cc[1:]))
        out.append(("monotone (chance-corrected)", ct, ok,
                    "chance-corrected IIS over the shares: " + ", ".join(f"{v:.4f}" for v in cc)))
        ctrl = rows[n_share]
        above = [names[i] for i in range(n_share - 1) if not ctrl["iis"] < rows[i]["iis"]]
        last = rows[n_share - 1]
        ok = not above and last["vs_next"] != "< next"
        out.append(("control last", ct, ok,
                    f"control IIS {ctrl['iis']:.4f}" + (f" not below {', '.join(above)}" if above else
                                                        " below every share < 1") +
                    f"; {names[n_share - 1]} vs control: {_pair(names[n_share - 1], 'control', last)} "
                    f"({'control above it' if last['vs_next'] == '< next' else 'not above it'})"))
        base = next(i for i, r in enumerate(scaled) if r.scale == 1.0)
        for i, r in enumerate(scaled):
            if i == base:
                continue
            lo, hi = sorted((i, base))
            row = srows[lo]          # the report's verdict of row lo against row lo + 1
            diff = srows[i]["iis"] - srows[base]["iis"]
            ok = row["vs_next"] == "no detectable difference" and abs(diff) <= suite.scale_tolerance
            heads = [abs(srows[i][k] - srows[base][k]) for k in srows[i] if k.startswith("top1@")]
            # IIS is proportional to 1 / standard top-1: what the difference would be with x1's probe
            heads_only = srows[i]["iis"] * srows[i]["standard_top1"] / srows[base]["standard_top1"] - srows[base]["iis"]
            out.append(("scale", ct, ok,
                        f"x{r.scale:g}: IIS {srows[i]['iis']:.4f} vs x1 {srows[base]['iis']:.4f} (difference "
                        f"{diff:+.4f}, paired p = {row['vs_next_p']:.3g}); standard top-1 "
                        f"{srows[i]['standard_top1']:.2f} % vs {srows[base]['standard_top1']:.2f} %" +
                        (f"; concept heads' top-1 within {max(heads):.2f} points of x1's" if heads else "") +
                        f"; with x1's standard top-1 as the denominator the difference would be {heads_only:+.4f}"))
        tops = [r["standard_top1"] for r in rows + srows]
        chance = max(r["chance"] for r in rows + srows)
        ok = max(tops) <= suite.max_standard_top1 and min(tops) >= chance + 20
        out.append(("workload", ct, ok, f"standard top-1 {min(tops):.2f}-{max(tops):.2f} % (chance {chance:.2f} %, "
                                        f"ceiling {suite.max_standard_top1:g} %)"))
    cts = list(tables)
    for i in range(len(cts)):
        for j in range(i + 1, len(cts)):
            a = [r["iis"] for r in tables[cts[i]][0][:n_share]]
            b = [r["iis"] for r in tables[cts[j]][0][:n_share]]
            tau = kendall_tau(a, b)
            out.append(("agree", f"{cts[i]}/{cts[j]}", tau == 1.0, f"Kendall tau over the shares {tau:+.2f}"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Table and figure
# ---------------------------------------------------------------------------------------------------------------------
def _iv(r, k, nd=4):
    return f"{r[k]:.{nd}f} [{r[k + '_lo']:.{nd}f}, {r[k + '_hi']:.{nd}f}]"


def markdown(suite, name, curve, scaled, tables, results, figure):
    lines = [f"# Validity suite ({name} configuration)", "",
             f"`python -m bench.validity --config {name}`; configuration key `{suite.key_id()}`. Planted data: "
             f"`{asdict(suite.data)}`; concepts per type: `{dict(suite.n_concepts)}`; trainer flags: "
             f"`{' '.join(suite.trainer_flags) or '(the project defaults)'}`; {suite.bootstrap} bootstrap resamples "
             f"of the val samples (95 % intervals; paired verdicts from `iis_computing.py --report`).", "",
             "## IIS against the planted non-concept share", "",
             "| representation | " + " | ".join(f"{ct} standard top-1 | {ct} IIS [95 %] | {ct} chance-corrected IIS"
                                               for ct in tables) + " |",
             "|---|" + "---|---|---|" * len(tables)]
    for i, rep in enumerate(curve):
        cells = []
        for ct, (rows, _) in tables.items():
            r = rows[i]
            cells += [f"{r['standard_top1']:.2f}", _iv(r, "iis"), _iv(r, "iis_cc")]
        lines.append(f"| {rep.name} | " + " | ".join(cells) + " |")
    lines += ["", f"## Scale (share {suite.scale_share:g}, features and element embeddings multiplied)", "",
              "| scale | " + " | ".join(f"{ct} standard top-1 | {ct} IIS [95 %] | {ct} top-1 at s=0" for ct in tables)
              + " |", "|---|" + "---|---|---|" * len(tables)]
    for i, rep in enumerate(scaled):
        cells = []
        for ct, (_, srows) in tables.items():
            r = srows[i]
            cells += [f"{r['standard_top1']:.2f}", _iv(r, "iis"), f"{r['top1@0']:.2f}"]
        lines.append(f"| x{rep.scale:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Properties", ""]
    lines += [f"* **{'PASS' if ok else 'FAIL'}** {prop} [{ct}]: {line}" for prop, ct, ok, line in results]
    lines += ["", f"Figure: `{os.path.basename(figure)}` (left: IIS against the share with 95 % intervals, the "
                  "control at the right; middle: chance-corrected IIS; right: IIS at each feature scale).", ""]
    return "\n".join(lines)


def figure(suite, curve, scaled, tables, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=120)
    n = len(suite.shares)
    xs = list(suite.shares)
    ctrl_x = 1.15
    for j, (ct, (rows, srows)) in enumerate(tables.items()):
        off = (j - 1) * 0.012
        for ax, key in ((axes[0], "iis"), (axes[1], "iis_cc")):
            y = [r[key] for r in rows]
            err = [[r[key] - r[key + "_lo"] for r in rows], [r[key + "_hi"] - r[key] for r in rows]]
            line = ax.errorbar([x + off for x in xs], y[:n], yerr=[e[:n] for e in err], marker="o", ms=4, capsize=3,
                               label=ct)
            ax.errorbar([ctrl_x + off], y[n:], yerr=[e[n:] for e in err], marker="s", ms=5, capsize=3,
                        color=line[0].get_color(), ls="none")
        y = [r["iis"] for r in srows]
        err = [[r["iis"] - r["iis_lo"] for r in srows], [r["iis_hi"] - r["iis"] for r in srows]]
        axes[2].errorbar([k * (1 + off * 4) for k in (r.scale for r in scaled)], y, yerr=err, marker="o", ms=4,
                         capsize=3, label=ct)
    for ax, title in ((axes[0], "IIS"), (axes[1], "chance-corrected IIS")):
        ax.set_xticks(xs + [ctrl_x])
        ax.set_xticklabels([f"{x:g}" for x in xs] + ["random\ncontrol"])
        ax.set_xlabel("planted non-concept share of the class information")
        ax.set_title(f"{title} (95 % bootstrap intervals over val samples)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_xscale("log")
    axes[2].set_xlabel(f"feature scale (share {suite.scale_share:g})")
    axes[2].set_title("IIS under feature scale (must be flat)", fontsize=9)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Validity suite: planted representations, {len(tables)} concept types "
                 f"({suite.data.n_train} train / {suite.data.n_val} val, {suite.data.n_classes} classes, "
                 f"{suite.data.n_concepts} planted concepts in {suite.data.dim}-d)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def publish(files):
    """Write {path: bytes} aside, then rename each into place: a killed run leaves the old set or the new one."""
    tmps = []
    for path, data in files.items():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        tmps.append((tmp, path))
    for tmp, path in tmps:
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="full", choices=sorted(CONFIGS), help="full: the documented table; ci: small")
    p.add_argument("--work", default=None, help="work folder (default: outputs/validity/<config>-<key>)")
    p.add_argument("--results_dir", default=None,
                   help="where validity.md and validity.png go (default: bench/results for full, the work folder "
                        "for ci)")
    p.add_argument("--jobs", type=int, default=2, help="trainings run side by side (one thread each)")
    p.add_argument("--concept_types", nargs="+", default=None, choices=CONCEPT_TYPES,
                   help="a subset of the configuration's concept types")
    p.add_argument("--trainer_flags", default=None,
                   help="replace the configuration's extra IP_Prototype_training flags, e.g. \"--epochs 60\"")
    return p


def main(args):
    start = time.perf_counter()
    suite = CONFIGS[args.config]
    if args.concept_types:
        suite = replace(suite, concept_types=tuple(args.concept_types))
    if args.trainer_flags is not None:
        suite = replace(suite, trainer_flags=tuple(args.trainer_flags.split()))
    if args.jobs < 1:
        raise SuiteError(f"--jobs must be at least 1, got {args.jobs}")
    work = args.work or os.path.join(REPO, "outputs", "validity", f"{args.config}-{suite.key_id()}")
    results_dir = args.results_dir or (os.path.join(REPO, "bench", "results") if args.config == "full" else work)
    p = suite.data
    lat = planted.latent(p)
    curve, scaled = representations(suite)
    reps = {r.name: r for r in curve + scaled}
    print(f"validity suite ({args.config}, key {suite.key_id()}): {len(reps)} representations x "
          f"{len(suite.concept_types)} concept types, work folder {work}", flush=True)
    for rep in reps.values():
        write_entries(os.path.join(work, "entries", rep.name), rep, p, lat)
    n_concepts = dict(suite.n_concepts)
    jobs = [(f"{ct} {rep.name}", train_command(os.path.join(work, "entries", rep.name),
                                                os.path.join(work, "runs", ct, rep.name), ct, n_concepts[ct],
                                                suite.trainer_flags))
            for ct in suite.concept_types for rep in reps.values()]
    run_all(jobs, args.jobs, "train", os.path.join(work, "logs"))
    tables = {}
    for ct in suite.concept_types:
        runs = lambda rs: [os.path.join(work, "runs", ct, r.name) for r in rs]   # noqa: E731
        tables[ct] = (score(runs(curve), os.path.join(work, "reports", f"{ct}_curve"), suite.bootstrap),
                      score(runs(scaled), os.path.join(work, "reports", f"{ct}_scale"), suite.bootstrap))
    results = check(suite, curve, scaled, tables)
    png = os.path.join(results_dir, "validity.png" if args.config == "full" else f"validity_{args.config}.png")
    md = png[:-4] + ".md"
    tmp_png = f"{png}.draw-{os.getpid()}.png"
    os.makedirs(results_dir, exist_ok=True)
    figure(suite, curve, scaled, tables, tmp_png)
    with open(tmp_png, "rb") as f:
        png_bytes = f.read()
    os.remove(tmp_png)
    publish({md: markdown(suite, args.config, curve, scaled, tables, results, png).encode(), png: png_bytes})
    with open(os.path.join(work, "checks.json"), "w") as f:
        json.dump([dict(property=a, concept_type=b, ok=c, line=d) for a, b, c, d in results], f, indent=1)
    for prop, ct, ok, line in results:
        print(f"{'PASS' if ok else 'FAIL'} {prop} [{ct}]: {line}")
    failed = [r for r in results if not r[2]]
    print(f"table: {md}\nfigure: {png}\n({time.perf_counter() - start:.0f} s)")
    if failed:
        print(f"validity suite: {len(failed)} of {len(results)} properties FAILED: "
              + "; ".join(sorted({f'{prop} [{ct}]' for prop, ct, _, _ in failed})))
        return 1
    print(f"validity suite: all {len(results)} properties hold")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
