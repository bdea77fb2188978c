r"""The random-concept floor beside an IIS, what gives a positive concept lift, and why the demo's library has none.

    python -m bench.concept_floor                       # every section on the demo's outputs (after scripts/demo.sh)
    python -m bench.concept_floor --sections floor      # one section: floor | why | fix | planted | mechanism
    python -m bench.concept_floor --md bench/results/concept_floor.md --png bench/results/concept_floor.png

Floor = the IIS of the same features with K random directions as Prototype concepts (same K, same training), over
--draws draws. A floor is one trainer run on a pool of --pool x K iid random directions with --seeds 0 .. draws-1:
each seed's balanced selection draws its own K of them (K iid directions, overlapping other draws by about 1/pool),
and shares initialisation, batch order and dev split with the same seed of a concept run trained with --seeds 0 1 2.
Concept lift = IIS - floor, with a PAIRED bootstrap interval: every run is scored by utils/stats.py on the same
resamples of the same val samples (same n, same bootstrap seed), so the lift's samples are IIS_b(concepts) -
IIS_b(floor), each the mean over its seeds. The interval covers the val sampling with the heads fixed; the spread of
the floor over its draws (std of the per-seed IIS) is printed beside it.

Every run is the real trainer (python -m IP_training.IP_Prototype_training as a subprocess, its default iis
protocol, K = --n_concepts): this script only writes the concept store entries (utils.store.write) it reads, each
keyed by the construction, its parameters, the draw and the inputs' key hashes, in its own folder under --work. The
trainer skips a run whose results.json matches its key, so a second invocation only rescores.

Floors (random directions, all K x D, then unit-normalised by the trainer):
  iso      N(0, I_D): isotropic, knows nothing of the library; the same for every concept type of the same K
  mean     e_bar + sigma N(0, I_D), sigma set so the rows' mean pairwise cosine equals the elements': the library's
           shared direction and nothing else
  matched  N(e_bar, Sigma_e), drawn as e_bar + A^T g / sqrt(n - 1) (A = centred elements, g ~ N(0, I_n)): the
           library's first two moments, no element identities
  shuffle  every coordinate of K element rows drawn independently from that column (each dimension's marginal,
           no joint structure)
  rows     K random train feature rows (whole-image features: not random in meaning; an upper reference)

Sections:
  floor     real Prototype / Cluster (/ End-to-end with --e2e) concepts against the floors
  why       one intervention at a time on the real library, paired against it (centre, whiten, fill 0, drop
            background, de-duplicate, selection), each with its lift over the iso floor
  fix       the constructions that could be documented options, on Prototype and Cluster, with their lifts
  planted   synthetic features (K_true concept directions carry a share 1 - rho of the class information, dense class
            directions carry rho; elements are noisy copies of the concept directions), true concepts vs floor over
            rho, and the same with the demo's pathologies planted (a shared offset, background elements) and fixed
  mechanism the trainer's own heads (utils.heads.fit) on the demo's fixed concept scores with LayerNorm replaced, to
            see what the LayerNorm over concepts does with a shared direction (library-level, not through the CLI)

Prints the machine, each table with 95 % paired intervals and p-values; --md/--png write the report and figure.
"""
import argparse
import os
import time

from bench.common import hardware
from bench.floor_common import FLOORS, Demo, Scorer, centred, dedup_rows, mean_cosine, table, whitened
from bench.floor_planted import section_cost, section_mechanism, section_planted
from utils import fileio

SECTIONS = ("floor", "why", "fix", "planted", "mechanism", "cost")


def section_floor(demo, sc):
    types = ["prototype", "cluster"] + (["end2end"] if demo.args.e2e else [])
    real = {ct: [demo.real(ct)] for ct in types}     # the concepts first: they matter most if the run is cut
    iso = demo.floor("iso")
    rows = [sc.row(f"floor: {kind} ({demo.args.draws} draws)", demo.floor(kind)) for kind in demo.args.floors]
    for ct in types:
        rows.append(sc.row(f"{ct} (3 seeds), lift over iso", real[ct], iso))
        for kind in demo.args.floors:
            if kind != "iso":
                rows.append(sc.row(f"{ct}, lift over {kind}", real[ct], demo.floor(kind)))
    note = (f"K = {demo.args.n_concepts}; element embeddings' mean pairwise cosine {mean_cosine(demo.emb):.3f}; "
            f"each floor row is the mean over its draws (draw d trained with --seeds d), '± draws' their std.")
    return table("Real concepts against random-direction floors", rows, note), rows


def interventions(demo):
    """(name, entry or None for the real one, trainer extras) of the 'why' section: one change at a time, in the
    order they are trained (the most telling first)."""
    e, lab, bg = demo.emb, demo.labels, demo.background()
    fg = bg <= demo.args.background
    keep = dedup_rows(e, demo.args.dedup)
    _, e0, lab0 = demo.element_library(fill=0)
    eps = demo.args.whiten_eps
    return [
        (f"fill 0 instead of 117 (mean cosine {mean_cosine(e0):.3f})", demo.entry("fill0", e0, lab0), ()),
        (f"background dropped ({(~fg).sum()} of {len(e)} elements with dark share > {demo.args.background:g})",
         demo.entry("foreground", e[fg], lab[fg]), ()),
        (f"centred (mean removed; mean cosine {mean_cosine(centred(e)):+.3f})", demo.entry("centre", centred(e), lab),
         ()),
        (f"whitened (ZCA within the library's span, eps {eps:g})",
         demo.entry("whiten", whitened(e, eps), lab, eps=eps), ()),
        (f"background only ({(~fg).sum()} elements)", demo.entry("background", e[~fg], lab[~fg]), ()),
        (f"de-duplicated (cosine > {demo.args.dedup:g} dropped: {len(e) - len(keep)} of {len(e)})",
         demo.entry("dedup", e[keep], lab[keep], threshold=demo.args.dedup), ()),
        ("random selection (not balanced)", None, ("--concept_selection", "random")),
    ]


def section_why(demo, sc):
    iso = demo.floor("iso")
    base = [demo.real()]
    rows = [sc.row("real library (prototype, balanced, 3 seeds)", base, iso)]
    for name, entry, extra in interventions(demo):
        run = demo.real(extra=extra) if entry is None else demo.run(entry, extra=extra)
        rows.append(sc.row(name, [run], iso, base))
    note = (f"Prototype, K = {demo.args.n_concepts}, seeds 0 1 2; lift over the iso floor ({demo.args.draws} draws); "
            f"'vs base' = this row minus the real library, paired.")
    return table("One change at a time on the demo's library", rows, note), rows


def section_fix(demo, sc):
    """Element libraries closer to the images the features come from, on Prototype and Cluster concepts: grid
    patches (the paper's other element type: no fill, no mask) and segments on the dataset's own black background."""
    iso = demo.floor("iso")
    _, ep, labp = demo.element_library(method="patches")
    _, e0, lab0 = demo.element_library(fill=0)
    options = [(f"grid patches 2x2 + 3x3 ({len(ep)} elements, mean cosine {mean_cosine(ep):.3f})",
                demo.entry("patches", ep, labp)),
               ("segments on fill 0", demo.entry("fill0", e0, lab0))]
    rows = []
    for ct in ("prototype", "cluster"):
        base = [demo.real(ct)]
        rows.append(sc.row(f"{ct}: the demo's library (segments on grey 117)", base, iso))
        for name, entry in options:
            rows.append(sc.row(f"{ct}: {name}", [demo.run(entry, ct)], iso, base))
    note = (f"K = {demo.args.n_concepts}, seeds 0 1 2, lift over the iso floor; 'vs base' = this row minus the "
            f"demo's library with the same concept type, paired. Same images, backbone and trainer flags.")
    return table("Element libraries closer to the data", rows, note), rows


def plot(figure, path):
    """Lifts with their paired intervals (demo sections) and the planted IIS over rho with the floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    demo_rows = [r for name in ("floor", "why", "fix") for r in figure.get(name, []) if "lift" in r]
    planted = figure.get("planted", [])
    fig, axes = plt.subplots(1, 2, figsize=(15, max(4, 0.32 * len(demo_rows) + 1.5)),
                             gridspec_kw={"width_ratios": [1.4, 1]})
    ax = axes[0]
    for i, r in enumerate(demo_rows):
        c = r["lift"]
        ok = c["interval"][0] > 0
        ax.errorbar(c["difference"], i, xerr=[[c["difference"] - c["interval"][0]], [c["interval"][1] -
                    c["difference"]]], fmt="o", color="tab:green" if ok else "tab:red", capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(demo_rows)), [r["name"][:70] for r in demo_rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("concept lift = IIS - floor (95 % paired bootstrap interval)")
    ax.set_title("demo (Lite0, Fashion-MNIST 2000/1000, K = 200)")
    ax = axes[1]
    for variant in dict.fromkeys(r["variant"] for r in planted):
        pts = [r for r in planted if r["variant"] == variant]
        x = [r["rho"] for r in pts]
        y = [r["iis"] for r in pts]
        err = [[r["iis"] - r["interval"][0] for r in pts], [r["interval"][1] - r["iis"] for r in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=variant, ls="--" if "floor" in variant else "-")
    ax.set_xlabel("rho: share of class information on dense (non-concept) directions")
    ax.set_ylabel("IIS (95 % bootstrap interval)")
    ax.set_title("planted features")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    print(f"figure -> {path}")


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--features", default="outputs/features/fashion_mnist/efficientnet_lite0",
                   help="the demo's features folder (train/, val/ and the element embeddings)")
    p.add_argument("--elements", default="elements_segments", help="element embeddings entry under --features")
    p.add_argument("--data_root", default="data", help="dataset root (for re-cutting the library with fill 0)")
    p.add_argument("--work", default="outputs/bench/concept_floor", help="where concept entries and runs go")
    p.add_argument("--n_concepts", type=int, default=200, help="K, for the concepts and the floor")
    p.add_argument("--draws", type=int, default=3,
                   help="floor draws: the floor run's seeds 0 .. draws-1, each drawing its own K directions")
    p.add_argument("--pool", type=int, default=10, help="random directions in a floor's pool, in multiples of K")
    p.add_argument("--floors", nargs="+", default=["iso", "mean", "matched", "rows"], choices=FLOORS,
                   help="floor kinds in 'floor'")
    p.add_argument("--e2e", action="store_true", help="also End-to-end concepts in 'floor' (slow on a CPU)")
    p.add_argument("--background", type=float, default=0.5,
                   help="an element whose masked pixels are more than this share dark is background")
    p.add_argument("--dedup", type=float, default=0.9, help="cosine above which a later element is a duplicate")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                   help="planted: shares of the class information carried by dense directions")
    p.add_argument("--whiten_eps", type=float, default=1e-3,
                   help="whitening: share of the largest variance added to every variance")
    p.add_argument("--timing_repeats", type=int, default=1, help="cost: alternations of the two timed runs")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the val samples")
    p.add_argument("--bootstrap_seed", type=int, default=0)
    p.add_argument("--md", default=None, help="write the tables to this Markdown file")
    p.add_argument("--png", default=None, help="write the figure to this PNG file")
    return p


def main(args):
    t0 = time.perf_counter()
    machine = hardware()
    print(f"machine: {machine}", flush=True)
    sc = Scorer(args.bootstrap, args.bootstrap_seed)
    demo = Demo(args) if set(args.sections) - {"planted"} else None
    parts, figure = [], {}
    for name in args.sections:
        text, figure[name] = SECTION_FUNCS[name](demo, sc, args) if name == "planted" else \
            SECTION_FUNCS[name](demo, sc)
        parts.append(text)
    minutes = (time.perf_counter() - t0) / 60
    print(f"done in {minutes:.1f} min")
    if args.md:
        head = (f"# Concept floor and concept lift (`python -m bench.concept_floor`)\n\nMachine: {machine}. "
                f"Sections: {', '.join(args.sections)}; {args.bootstrap} paired bootstrap resamples of the val "
                f"samples (seed {args.bootstrap_seed}).\n\n")
        fileio.atomic_write_bytes(args.md, (head + "\n".join(parts)).encode())
    if args.png:
        plot(figure, args.png)


SECTION_FUNCS = {"floor": section_floor, "why": section_why, "fix": section_fix, "planted": section_planted,
                 "mechanism": section_mechanism,
                 "cost": section_cost}

if __name__ == "__main__":
    main(get_args_parser().parse_args())
