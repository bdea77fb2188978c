"""Head-sweep speed and agreement against the original code's loop, on realistic synthetic features, at its settings.

    python -m bench.bench_heads                       # CPU: 20 000 x 2048 train, 5 000 val, 100 classes (~11 min)
    python -m bench.bench_heads --quick               # smoke test: 4 000 x 512 / 1 000, 20 classes, 10 epochs
    python -m bench.bench_heads --baselines workers0 our_start   # without the 4-worker baseline (the slowest part)
    python -m bench.bench_heads --precision float32 --baselines our_start   # the systematic gap alone
    python -m bench.bench_heads --imagenet            # GPU: 1.28 M x 2048, 1 000 classes, ours only
    python -m bench.bench_heads --imagenet --seeds 3  # the same with three seeds stacked as extra heads

Workload: 100 classes whose features overlap (standard top-1 between 60 and 85 %, so a wrong head shows), non-negative
like post-ReLU features (a ReLU of a random 2048-d mixing of 64-d latent class centres plus noise), and 200 concepts
that are noisy copies of train features, as prototype concepts are. Settings: ``--protocol reference``'s, which are
the original's (batch 1024, Adam at lr 1e-2, ExponentialLR(0.99) per epoch, 30 epochs, 8 ratios + the standard probe,
its keep rule and its initialisation).

Baseline: bench/original_loop.py, the original's loop (its docstring lists what it reproduces), run with 0 loader
workers and with the 4 it ships with, seeded with --seed (the two runs then draw the same weights and batch orders,
so they agree exactly and differ only in time). Ours: the trainer's path under ``--protocol reference`` (normalised
concept scores computed once, every head trained together), in float32 and with bfloat16 matmuls, seed --seed.
The two sides draw their random numbers differently, so the gap between them holds seed noise as well as any
systematic difference; a third baseline run ("our start", 0 workers) starts from our initial weights and replays our
batch orders, so its gap to ours in float32 is the systematic part alone.

Prints its command line, the machine and its load, every time (wall, and CPU seconds of the process and its loader
workers), the speed ratios (ours float32 / bfloat16 against 0 / 4 workers; "our start" is a 0-worker run too), every
IIS and per-ratio accuracy, and each gap (IIS, standard and the largest per-ratio difference). On a machine shared with
other work the wall ratios are not the machine's: 4 loader workers are more processes competing for the cores.
"""
import argparse
import os
import shlex
import sys
import tempfile

import torch

from bench import original_loop
from bench.common import Timer, hardware
from utils.heads import SPARSITY_GRID, LinearProbes, SparseConceptHeads, Split, fit
from utils.iis import iis
from utils.sweep import PROTOCOLS, concept_scores

REFERENCE = PROTOCOLS["reference"]
SHAPE = dict(n_train=20000, n_val=5000, dim=2048, n_classes=100, n_concepts=200, epochs=30)
QUICK = dict(n_train=4000, n_val=1000, dim=512, n_classes=20, n_concepts=100, epochs=10)
IMAGENET = dict(n_train=1281167, n_val=50000, n_classes=1000)
BASELINES = {"workers0": "0 loader workers, seed --seed",
             "workers4": f"{original_loop.WORKERS_AS_SHIPPED} loader workers as shipped, seed --seed",
             "our_start": "0 workers from our initial weights and batch orders (its gap to ours is the systematic "
                          "one, without seed noise)"}


def synthetic(n_train, n_val, dim=2048, n_classes=100, n_concepts=200, latent=64, sigma=2.0, seed=0, device="cpu"):
    """(x, y, x_val, y_val, concepts): overlapping classes, non-negative features, concepts = noisy train rows."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(n_classes, latent, generator=g, device=device)
    mix = torch.randn(latent, dim, generator=g, device=device) / latent ** 0.5
    bias = 0.5 * torch.randn(dim, generator=g, device=device)

    def split(n):
        y = torch.randint(0, n_classes, (n,), generator=g, device=device)
        z = centres[y] + sigma * torch.randn(n, latent, generator=g, device=device)
        return torch.relu(z @ mix + bias + 0.5 * torch.randn(n, dim, generator=g, device=device)), y
    x, y = split(n_train)
    xv, yv = split(n_val)
    pick = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 1))[:n_concepts].to(device)
    concepts = torch.relu(x[pick] + 0.3 * torch.randn(n_concepts, dim, generator=g, device=device))
    return x, y, xv, yv, concepts


def ours(x, y, xv, yv, concepts, n_classes, epochs, batch_size, lr, feature_dtype=torch.float32, seeds=1,
         precision="float32", first_seed=0):
    """The trainer's path under --protocol reference: (standard top-1, [top-1 per ratio]) of the first seed.

    ``concepts`` is (K, D), or (S, K, D) for ``seeds`` > 1: each seed its own concepts, initialisation and batch
    order, stacked as extra heads of the one sweep (as ``--seeds`` does)."""
    device = x.device
    x, xv = x.to(feature_dtype), xv.to(feature_dtype)
    seed_list = list(range(first_seed, first_seed + seeds))
    groups = list(range(seeds))
    splits = [Split(torch.arange(len(y)), None, s) for s in seed_list]
    common = dict(epochs=epochs, batch_size=batch_size, lr_decay=REFERENCE["lr_decay"], splits=splits,
                  precision=precision)
    probes = LinearProbes(x.shape[1], n_classes, seeds, seed_list, groups=groups, init=REFERENCE["init"]).to(device)
    std = fit(probes, [lr] * seeds, x, y, xv, yv, desc="ours: probe", **common)["top1"][0]
    grid = [(g, s, r) for g, s in enumerate(seed_list) for r in SPARSITY_GRID]
    heads = SparseConceptHeads(concepts, n_classes, [r for _, _, r in grid], [s for _, s, _ in grid],
                               keep_rule=REFERENCE["keep_rule"], groups=[g for g, _, _ in grid],
                               init=REFERENCE["init"]).to(device)
    z, zv = concept_scores(heads, x, device), concept_scores(heads, xv, device)
    accs = fit(heads.on_scores(), [lr] * len(grid), z, y, zv, yv, desc=f"ours: {len(grid)} heads", **common)["top1"]
    return float(std), [float(a) for a in accs[:len(SPARSITY_GRID)]]


def same_start(n_train, dim, n_classes, concepts, epochs, seed):
    """(orders, init) for original_loop.run's hooks: the batch order of every epoch and the initial weights that
    ``ours`` draws for ``seed`` (utils.heads.fit's order: a torch.Generator seeded with the split's seed, one randperm
    per epoch; every head of a seed starts equal)."""
    probe = LinearProbes(dim, n_classes, 1, seed=seed, init=REFERENCE["init"])
    head = SparseConceptHeads(concepts, n_classes, [0.0], seed=seed, init=REFERENCE["init"])
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(n_train, generator=g) for _ in range(epochs)]
    with torch.no_grad():
        init = {"probe": (probe.weight[0].T.clone(), probe.bias[0].clone()),
                "head": tuple(p.clone() for p in (head.ln_weight[0], head.ln_bias[0], head.weight[0].T, head.bias[0]))}
    return orders, init


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", action="store_true",
                   help="ImageNet shape: 1 281 167 x 2048, 50 000 val, 1 000 classes; ours only (for a GPU)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()) + " (flags given win)")
    for name, value in SHAPE.items():
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {value}")
    p.add_argument("--sigma", type=float, default=2.0, help="latent noise: sets how much the classes overlap")
    p.add_argument("--batch_size", type=int, default=REFERENCE["batch_size"], help="the reference protocol's 1024")
    p.add_argument("--lr", type=float, default=REFERENCE["lrs"][0], help="the reference protocol's 1e-2")
    p.add_argument("--seed", type=int, default=0, help="both sides' seed (initialisation and batch order)")
    p.add_argument("--feature_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of our resident features")
    p.add_argument("--precision", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="ours: the heads' matmul precision(s) to time (each is one run of ours)")
    p.add_argument("--seeds", type=int, default=1,
                   help="ours: this many seeds stacked as extra heads (each its own concepts, init and order)")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES),
                   help="runs of the original's loop: " + "; ".join(f"{k}: {v}" for k, v in BASELINES.items())
                        + " (none given: ours only)")
    return p


def main(args):
    print("command: python -m bench.bench_heads " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    shape = dict(SHAPE, **(IMAGENET if args.imagenet else QUICK if args.quick else {}))
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.imagenet:
        args.baselines = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y, xv, yv, concepts = synthetic(args.n_train, args.n_val, args.dim, args.n_classes, args.n_concepts,
                                       sigma=args.sigma, device=device)
    if args.seeds > 1:   # further seeds draw their own noisy copies of other train rows
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[:(args.seeds - 1) * args.n_concepts]
        more = torch.relu(x[pick.to(device)] + 0.3 * torch.randn(len(pick), x.shape[1], device=device))
        concepts = torch.cat([concepts, more]).view(args.seeds, args.n_concepts, -1)
    print(f"{args.n_train} x {args.dim} train, {args.n_val} val, {args.n_classes} classes, {args.n_concepts} "
          f"concepts, {len(SPARSITY_GRID)} ratios + standard probe, {args.epochs} epochs, batch {args.batch_size}, "
          f"lr {args.lr} x{REFERENCE['lr_decay']}/epoch, init {REFERENCE['init']}, seed {args.seed}, "
          f"{args.seeds} seed(s) (ours), on {device}")
    print(f"hardware: {hardware()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results, times, cpu = {}, {}, {}
    for prec in args.precision:
        name = f"ours, {prec}"
        with Timer() as t:
            results[name] = ours(x, y, xv, yv, concepts, args.n_classes, args.epochs, args.batch_size, args.lr,
                                 getattr(torch, args.feature_dtype), args.seeds, prec, args.seed)
        times[name], cpu[name] = t.seconds, t.cpu
        print(f"{name}: {t.seconds:.1f} s, {t.cpu:.1f} CPU s ({t.seconds / args.epochs:.2f} s/epoch, all ratios + "
              "probe)", flush=True)
    mine = list(results)
    if args.baselines:
        xn, yn, xvn, yvn = (a.cpu() for a in (x, y, xv, yv))
        cn = (concepts if concepts.ndim == 2 else concepts[0]).cpu()
        shipped = original_loop.WORKERS_AS_SHIPPED
        runs = [("original, 0 workers", 0, {})] if "workers0" in args.baselines else []
        if "workers4" in args.baselines:
            runs.append((f"original, {shipped} workers", shipped, {}))
        if "our_start" in args.baselines:
            orders, init = same_start(len(yn), args.dim, args.n_classes, cn, args.epochs, args.seed)
            runs.append(("original, our start", 0, dict(orders=orders, init=init)))
        for name, workers, hooks in runs:
            with tempfile.TemporaryDirectory() as save_dir, Timer() as t:
                results[name] = original_loop.run(xn, yn, xvn, yvn, cn, args.n_classes, SPARSITY_GRID,
                                                  epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                                  workers=workers, seed=args.seed, device=device, save_dir=save_dir,
                                                  **hooks)
            times[name], cpu[name] = t.seconds, t.cpu
            print(f"{name}: {t.seconds:.1f} s, {t.cpu:.1f} CPU s", flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    names = list(results)
    w = 22
    print(f"\n{'':>8}" + "".join(f"{n:>{w}}" for n in names))
    print(f"{'standard':>8}" + "".join(f"{results[n][0]:>{w}.2f}" for n in names))
    for i, r in enumerate(SPARSITY_GRID):
        print(f"{'s=' + format(r, 'g'):>8}" + "".join(f"{results[n][1][i]:>{w}.2f}" for n in names))
    scores = {n: iis(SPARSITY_GRID, results[n][1], results[n][0]) for n in names}
    print(f"{'IIS':>8}" + "".join(f"{scores[n]:>{w}.4f}" for n in names))
    print(f"{'seconds':>8}" + "".join(f"{times[n]:>{w}.1f}" for n in names))
    print(f"{'CPU s':>8}" + "".join(f"{cpu[n]:>{w}.1f}" for n in names))
    print()
    for m in mine:
        for n in names[len(mine):]:
            gap = max(abs(a - b) for a, b in zip(results[m][1], results[n][1]))
            speed = f"{times[n] / times[m]:.1f}x faster ({cpu[n] / cpu[m]:.1f}x in CPU seconds); "
            print(f"{m} against {n}: {speed}IIS {scores[m] - scores[n]:+.4f}, standard "
                  f"{results[m][0] - results[n][0]:+.2f} points, largest per-ratio gap {gap:.2f} points")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
