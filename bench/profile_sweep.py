r"""Where a head sweep's time goes: the visual trainer run end to end on the bench_heads workload, start-up included.

    python -m bench.profile_sweep                                  # CPU, --protocol reference, float32
    python -m bench.profile_sweep --threads 1 --precision bfloat16 --md /tmp/p.md   # as profile_sweep_cpu.md
    python -m bench.profile_sweep --protocol iis                   # holdout selection, 2 lrs, batch 256
    python -m bench.profile_sweep --device cuda --imagenet         # the GPU profile: 1.28 M x 2048, 1 000 classes

What it runs: ``IP_training.IP_Prototype_training.main`` itself, on store entries holding bench_heads' synthetic
workload (100 overlapping classes, 20 000 x 2048 train, 5 000 val, 200 concepts = every element, 30 epochs), written
once to --workdir. ``--in_memory`` (the default with --imagenet, whose entries would be 10 GB) hands the trainer
the same arrays without a store, so reading and validating them is not measured.

How: the trainer's steps and the sweep's inner calls (batch gather, forward, top-k mask, cross-entropy, backward,
Adam, evaluation) are wrapped in timers for that one run; each region's wall time and process CPU time (all threads)
are inclusive and nested as they are called. On CUDA every region ends with a synchronisation (``--sync off`` to
skip: regions then time kernel launches, not kernels), which serialises the host and the device, so the total
exceeds an unprofiled run (``python -m bench.bench_heads --imagenet`` times that). Then ``--ops_epochs`` epochs run
under torch.profiler for the operators' self times (CPU, and CUDA kernels on a GPU). Start-up: ``python -X
importtime`` of the trainer in a fresh interpreter. Timings on a loaded machine are noisy: compare CPU seconds, or
ratios taken in one run.
"""
import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from bench.bench_heads import synthetic
from bench.common import hardware

IMAGENET = dict(n_train=1281167, n_val=50000, n_classes=1000, batch_size=8192)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda (auto: cuda if available)")
    p.add_argument("--imagenet", action="store_true",
                   help="ImageNet shape: 1 281 167 x 2048, 50 000 val, 1 000 classes, batch 8192 (as gpu_check.sh)")
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--n_val", type=int, default=5000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--n_classes", type=int, default=100)
    p.add_argument("--n_concepts", type=int, default=200)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--protocol", default="reference", choices=["reference", "iis"])
    p.add_argument("--batch_size", type=int, default=None, help="default: the protocol's (8192 with --imagenet)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--in_memory", action="store_true", default=None,
                   help="give the trainer the arrays without writing store entries (default with --imagenet)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "iis_profile_sweep"),
                   help="where the workload's store entries and the runs' outputs go")
    p.add_argument("--sync", default="auto", choices=["auto", "on", "off"],
                   help="CUDA: synchronise at the end of every region (auto: on CUDA)")
    p.add_argument("--ops_epochs", type=int, default=2, help="epochs profiled by torch.profiler (0: none)")
    p.add_argument("--top_ops", type=int, default=15, help="operators listed")
    p.add_argument("--md", default=None, help="also write the tables as markdown here")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# timed regions
# ---------------------------------------------------------------------------------------------------------------------
class Regions:
    """Inclusive wall and CPU seconds per call path (tuple of region names)."""

    def __init__(self, sync):
        self.sync, self.stack = sync, []
        self.wall, self.cpu, self.calls = defaultdict(float), defaultdict(float), defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name):
        self.stack.append(name)
        path = tuple(self.stack)
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.wall[path] += time.perf_counter() - w
            self.cpu[path] += time.process_time() - c
            self.calls[path] += 1
            self.stack.pop()

    def rows(self):
        """(indented name, calls, wall, cpu) in call order, children under their parent."""
        paths = sorted(self.wall, key=lambda p: [list(self.wall).index(p[:i + 1]) for i in range(len(p))])
        return [("  " * (len(p) - 1) + p[-1], self.calls[p], self.wall[p], self.cpu[p]) for p in paths]


def _wrap(owner, attr, label, regions, patches):
    """Time every call of ``owner.attr`` as region ``label`` (a string or a function of the call's arguments)."""
    if not hasattr(owner, attr):
        print(f"note: {getattr(owner, '__name__', owner)}.{attr} not found; not timed")
        return
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*a, **kw):
        with regions(label(*a, **kw) if callable(label) else label):
            return fn(*a, **kw)
    patches.append((owner, attr, fn))
    setattr(owner, attr, timed)


@contextlib.contextmanager
def instrumented(regions, fits):
    import torch.nn.functional as F

    import utils.heads as H
    import utils.probe as P
    import utils.sweep as S
    from IP_training import IP_Prototype_training as T
    patches = []
    for owner, attr, label in (
            (S, "load_split", "read + validate entries"), (T, "make_heads", "concepts + heads"),
            (S, "features", "features to device"), (S, "concept_scores", "concept scores"),
            (S, "make_splits", "splits"),
            (S, "fit", lambda *a, **kw: _record_fit(fits, *a, **kw)), (S, "save", "write results"),
            (P, "fit_standard", "fit: standard probe"),     # the iis protocol's converged probe (L-BFGS, no epochs)
            (H, "gather", "batch rows"), (H, "keep_weights", "top-k mask"),
            (F, "cross_entropy", "cross-entropy"), (torch.autograd, "grad", "backward"), (H._Adam, "step", "Adam"),
            (H, "evaluate", lambda *a, **kw: "evaluate " + ("dev" if kw.get("row_groups") is not None else "val"))):
        _wrap(owner, attr, label, regions, patches)
    for cls in (H.LinearProbes, H.SparseConceptHeads):
        for attr in ("forward", "forward_scores"):
            if attr in vars(cls):
                _wrap(cls, attr, "forward", regions, patches)
    try:
        yield
    finally:
        for owner, attr, fn in reversed(patches):
            setattr(owner, attr, fn)


def _record_fit(fits, module, lrs, x_train, y_train, x_val, y_val, **kw):
    """The region name of one fit call; notes its product shapes for :func:`gemm_floor`."""
    desc = kw.get("desc", "heads")
    weight = getattr(module, "heads", module).weight
    splits = kw.get("splits")
    fits.append(dict(desc=desc, weight=tuple(weight.shape), batch=kw.get("batch_size", 256),
                     precision=kw.get("precision", "float32"), epochs=kw.get("epochs", 30),
                     rows=len(splits[0].train) if splits else len(y_train), val=len(y_val),
                     dev=len(splits[0].dev) if splits and splits[0].dev is not None else 0,
                     sparse=desc != "standard probe"))
    return f"fit: {desc}"


def _bmm_seconds(shape_a, shape_b, dtype, device, reps=7):
    """(wall, process CPU) seconds of one batched product (H, m, k) @ (H, k, n) on ``device`` in ``dtype``: the
    fastest of ``reps`` calls, each clock on its own (a floor; on a shared machine the mean carries the others' load)."""
    a = torch.randn(shape_a, device=device).to(dtype)
    b = torch.randn(shape_b, device=device).to(dtype)
    best = np.full(2, np.inf)
    for _ in range(reps + 1):   # the first call warms up
        w, c = time.perf_counter(), time.process_time()
        a.bmm(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = np.minimum(best, [time.perf_counter() - w, time.process_time() - c])
    return best


def gemm_floor(fits, regions, device):
    """[(fit, training products (wall, CPU) s, evaluation products (wall, CPU) s)]: the sweep's matrix products alone, timed here at its
    shapes and scaled to the run's batches and evaluated rows: per training batch the forward product and the
    weights' gradient, and for concept heads the activations' gradient too (H x B x F x C each); per evaluation the
    forward product, in float32 as evaluate computes it. A sweep cannot go below it on this device without fewer or
    cheaper products; the rest of its time is everything else."""
    out = []
    for f in fits:
        (h, k, c), b = f["weight"], f["batch"]
        dt = torch.bfloat16 if f["precision"] == "bfloat16" else torch.float32
        steps = f["epochs"] * f["rows"] / b
        per_step = _bmm_seconds((h, b, k), (h, k, c), dt, device) + _bmm_seconds((h, k, b), (h, b, c), dt, device)
        if f["sparse"]:
            per_step += _bmm_seconds((h, b, c), (h, c, k), dt, device)
        path = ("trainer main", f"fit: {f['desc']}")
        evaluated = sum(regions.calls.get(path + ("evaluate " + w,), 0) * f[w] for w in ("val", "dev"))
        ev = evaluated / 4096 * _bmm_seconds((h, 4096, k), (h, k, c), torch.float32, device)   # evaluate's chunks
        out.append((f["desc"], steps * per_step, ev))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------------------------------------------------
def _entry(args, name):
    """(key, info) of one workload entry."""
    bb = {"name": "synthetic", "arch": "synthetic", "weights": "none", "layer": "x", "pooling": "avg"}
    data = dict(n_train=args.n_train, n_val=args.n_val, dim=args.dim, n_classes=args.n_classes,
                n_concepts=args.n_concepts, split=name, generator="bench_heads.synthetic")
    return {"backbone": bb, "data": data}, {"classes": [f"c{i}" for i in range(args.n_classes)], "backbone": bb}


def workload(args, device):
    """[(name, arrays, key, info)] of the train, val and element entries."""
    x, y, xv, yv, concepts = synthetic(args.n_train, args.n_val, args.dim, args.n_classes, args.n_concepts,
                                       device=device)
    parts = (("train", dict(features=x, labels=y, indices=torch.arange(len(y)))),
             ("val", dict(features=xv, labels=yv, indices=torch.arange(len(yv)))),
             ("elements", dict(features=concepts, labels=torch.arange(len(concepts)) % args.n_classes)))
    return [(name, {k: v.cpu().numpy() for k, v in arrays.items()}, *_entry(args, name)) for name, arrays in parts]


def write_workload(args, device):
    """Store entries of the workload under --workdir (made once, reused while their keys match); their paths."""
    from utils import store
    paths = {n: os.path.join(args.workdir, f"{n}-{store.key_hash(_entry(args, n)[0])}")
             for n in ("train", "val", "elements")}
    if not all(store.is_current(p, _entry(args, n)[0]) for n, p in paths.items()):
        for name, arrays, key, info in workload(args, device):
            store.write(paths[name], arrays, key, info)
    return paths


@contextlib.contextmanager
def in_memory(parts):
    """The trainer reads ``parts`` from memory: load_split returns them, as a store entry would after its checks."""
    import utils.sweep as S
    from utils import store
    entries = {name: (arrays, {"key": key, "key_hash": store.key_hash(key), "info": info})
               for name, arrays, key, info in parts}
    real = S.load_split
    S.load_split = lambda path, *a, **kw: entries[path]
    try:
        yield {n: n for n in entries}
    finally:
        S.load_split = real


def trainer_args(args, paths, out, epochs):
    from IP_training import IP_Prototype_training as T
    argv = ["--train_features", paths["train"], "--val_features", paths["val"], "--concepts", paths["elements"],
            "--out", out, "--n_concepts", "0", "--protocol", args.protocol, "--epochs", str(epochs),
            "--floor_draws", "0",           # the concept sweep alone: the random-concept floor is a sweep of its own
            "--precision", args.precision, "--device", str(args.device), "--seeds", *map(str, args.seeds)]
    if args.batch_size:
        argv += ["--batch_size", str(args.batch_size)]
    return T.get_args_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# start-up
# ---------------------------------------------------------------------------------------------------------------------
def import_times(module="IP_training.IP_Prototype_training"):
    """(seconds to start Python, seconds to import ``module`` in a fresh interpreter, [(package, own seconds)]): each
    package's import time excluding what it imports from other packages (-X importtime's self times, summed)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True,
                       check=True)
    own = defaultdict(float)
    for line in r.stderr.splitlines():   # "import time:  self [us] | cumulative | imported package"
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \| \s*(\S+)", line)
        if m:
            own[m.group(2).split(".")[0]] += int(m.group(1)) / 1e6
    return bare, sum(own.values()), sorted(own.items(), key=lambda kv: -kv[1])


# ---------------------------------------------------------------------------------------------------------------------
def op_table(args, paths, device, n):
    """Top operators by self time over ``args.ops_epochs`` epochs under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from IP_training import IP_Prototype_training as T
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    targs = trainer_args(args, paths, os.path.join(args.workdir, f"ops-{os.getpid()}"), args.ops_epochs)
    with profile(activities=acts) as prof:
        T.main(targs)
    ev = prof.key_averages()
    if device.type == "cuda":   # the kernels themselves, by device time
        rows = [e for e in ev if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA] or list(ev)
        key = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))   # noqa: E731
    else:
        rows, key = list(ev), (lambda e: e.self_cpu_time_total)   # noqa: E731
    total = sum(key(e) for e in rows) or 1
    top = sorted(rows, key=key, reverse=True)[:n]
    return [(e.key[:90], e.count, key(e) / 1e6, 100 * key(e) / total) for e in top], \
        ("CUDA kernel" if device.type == "cuda" else "CPU")


def table(header, rows, fmt):
    line = "| " + " | ".join(header) + " |"
    return "\n".join([line, "|" + "---|" * len(header)] + ["| " + " | ".join(f.format(v) for f, v in zip(fmt, r))
                                                           + " |" for r in rows])


def main(args):
    if args.imagenet:
        for k, v in IMAGENET.items():
            setattr(args, k, v if k != "batch_size" or args.batch_size is None else args.batch_size)
        args.in_memory = True if args.in_memory is None else args.in_memory
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.device = str(device)
    sync = device.type == "cuda" and args.sync != "off"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.workdir, exist_ok=True)
    from IP_training import IP_Prototype_training as T
    bare, imports, top = import_times()

    t = time.perf_counter()
    if args.in_memory:
        ctx = in_memory(workload(args, device))
    else:
        ctx = contextlib.nullcontext(write_workload(args, device))
    with ctx as paths:
        prep = time.perf_counter() - t
        regions, fits = Regions(sync), []
        out = os.path.join(args.workdir, f"run-{os.getpid()}")
        with instrumented(regions, fits), regions("trainer main"):
            T.main(trainer_args(args, paths, out, args.epochs))
        floor = gemm_floor(fits, regions, device)
        ops, what = op_table(args, paths, device, args.top_ops) if args.ops_epochs else ([], "")

    shape = (f"{args.n_train} x {args.dim} train, {args.n_val} val, {args.n_classes} classes, {args.n_concepts} "
             f"concepts, {args.epochs} epochs, --protocol {args.protocol}, --precision {args.precision}, seeds "
             f"{args.seeds}, batch {args.batch_size or 'protocol default'}, {torch.get_num_threads()} threads, on "
             f"{device}{', in memory' if args.in_memory else ''}{', regions synchronised' if sync else ''}")
    total = regions.wall[("trainer main",)]
    lines = ["# Head-sweep profile\n", f"`{' '.join(['python -m bench.profile_sweep'] + sys.argv[1:])}`\n",
             f"{shape}  \nhardware: {hardware()}  \nmachine load (1-min average) at the end: "
             f"{os.getloadavg()[0]:.1f}; workload prepared in {prep:.1f} s (not counted)\n",
             "## Start-up (fresh interpreter)\n",
             table(["what", "s"], [("python -c pass", bare), ("imports of the trainer (-X importtime)", imports)]
                   + [(f"  {n} (own)", s) for n, s in top[:6]], ["{}", "{:.2f}"]),
             "\n## The trainer's main(), by region (inclusive, nested)\n",
             table(["region", "calls", "wall s", "CPU s", "% of main"],
                   [(n, c, w, cpu, 100 * w / total) for n, c, w, cpu in regions.rows()],
                   ["{}", "{}", "{:.2f}", "{:.2f}", "{:.1f}"])]
    floor.append(("trainer main", sum(f[1] for f in floor), sum(f[2] for f in floor)))
    rows = []
    for desc, train, ev in floor:
        path = ("trainer main",) + ((f"fit: {desc}",) if desc != "trainer main" else ())
        spent = np.array([regions.wall[path], regions.cpu[path]])
        rows.append((path[-1], *train, *ev, *(train + ev), *(100 * (train + ev) / spent)))
    lines += ["\n## The matrix products alone (timed here at the run's shapes and scaled to its batches: the floor "
              "without fewer or cheaper products)\n",
              table(["", "training wall s", "training CPU s", "evaluation wall s", "evaluation CPU s", "wall s",
                     "CPU s", "% of its wall", "% of its CPU"], rows, ["{}"] + ["{:.2f}"] * 6 + ["{:.0f}"] * 2)]
    if ops:
        lines += [f"\n## Operators by self {what} time, {args.ops_epochs} epoch(s) under torch.profiler\n",
                  table(["operator", "calls", f"self {what} s", "%"], ops, ["`{}`", "{}", "{:.3f}", "{:.1f}"])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
