"""Head-sweep speed against the original code's loop, on realistic synthetic features, at the original's settings.

    python -m bench.bench_heads                     # CPU: 20 000 x 2048 train, 5 000 val, 100 classes, ~10 min
    python -m bench.bench_heads --skip_shipped      # without the 4-worker baseline (the slowest part)
    python -m bench.bench_heads --imagenet          # GPU: 1.28 M x 2048, 1 000 classes, ours only
    python -m bench.bench_heads --imagenet --seeds 3  # the same with three seeds stacked as extra heads

Workload: 100 classes whose features overlap (standard top-1 between 60 and 85 %, so a wrong head shows), non-negative
like post-ReLU features (a ReLU of a random 2048-d mixing of 64-d latent class centres plus noise), and 200 concepts
that are noisy copies of train features, as prototype concepts are. Settings: the original's (batch 1024, Adam at lr
1e-2, ExponentialLR(0.99) per epoch, 30 epochs, 8 ratios + the standard probe, its keep rule).

Baseline (bench/original_loop.py): the original's loop — a per-sample Dataset of dicts, a DataLoader with 4 workers
as shipped and, separately, with 0 workers, one module per ratio, NumPy validation. Ours: the trainer's path under
``--protocol reference`` (normalised concept scores computed once, every head trained together). Prints the
hardware, each time, the speed-ups, both IIS values and the per-ratio accuracies.
"""
import argparse

import torch

from bench import original_loop
from bench.common import Timer, hardware
from utils.heads import SPARSITY_GRID, LinearProbes, SparseConceptHeads, Split, fit
from utils.iis import iis
from utils.sweep import concept_scores


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
         precision="float32"):
    """The trainer's path under --protocol reference: (standard top-1, [top-1 per ratio]) of the first seed.

    ``concepts`` is (K, D), or (S, K, D) for ``seeds`` > 1: each seed its own concepts, initialisation and batch
    order, stacked as extra heads of the one sweep (as ``--seeds`` does)."""
    device = x.device
    x, xv = x.to(feature_dtype), xv.to(feature_dtype)
    seed_list = list(range(seeds))
    splits = [Split(torch.arange(len(y)), None, s) for s in seed_list]
    common = dict(epochs=epochs, batch_size=batch_size, lr_decay=0.99, splits=splits, precision=precision)
    probes = LinearProbes(x.shape[1], n_classes, seeds, seed_list, groups=seed_list).to(device)
    std = fit(probes, [lr] * seeds, x, y, xv, yv, desc="ours: probe", **common)["top1"][0]
    grid = [(s, r) for s in seed_list for r in SPARSITY_GRID]
    heads = SparseConceptHeads(concepts, n_classes, [r for _, r in grid], [s for s, _ in grid],
                               keep_rule="reference", groups=[s for s, _ in grid]).to(device)
    z, zv = concept_scores(heads, x, device), concept_scores(heads, xv, device)
    accs = fit(heads.on_scores(), [lr] * len(grid), z, y, zv, yv, desc=f"ours: {len(grid)} heads", **common)["top1"]
    return std, list(accs[:len(SPARSITY_GRID)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", action="store_true",
                   help="ImageNet shape: 1 281 167 x 2048, 50 000 val, 1 000 classes; ours only (for a GPU)")
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--n_val", type=int, default=5000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--n_classes", type=int, default=100)
    p.add_argument("--n_concepts", type=int, default=200)
    p.add_argument("--sigma", type=float, default=2.0, help="latent noise: sets how much the classes overlap")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=1024, help="the original's 1024 (ours too, unless changed)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--feature_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of our resident features")
    p.add_argument("--precision", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="ours: the heads' matmul precision(s) to time (each is one run of ours)")
    p.add_argument("--seeds", type=int, default=1,
                   help="ours: this many seeds stacked as extra heads (each its own concepts, init and order)")
    p.add_argument("--skip_shipped", action="store_true", help="skip the 4-worker baseline")
    p.add_argument("--skip_baseline", action="store_true", help="ours only")
    args = p.parse_args()
    if args.imagenet:
        args.n_train, args.n_val, args.n_classes, args.skip_baseline = 1281167, 50000, 1000, True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y, xv, yv, concepts = synthetic(args.n_train, args.n_val, args.dim, args.n_classes, args.n_concepts,
                                       sigma=args.sigma, device=device)
    if args.seeds > 1:   # further seeds draw their own noisy copies of other train rows
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[:(args.seeds - 1) * args.n_concepts]
        more = torch.relu(x[pick.to(device)] + 0.3 * torch.randn(len(pick), x.shape[1], device=device))
        concepts = torch.cat([concepts, more]).view(args.seeds, args.n_concepts, -1)
    print(f"{args.n_train} x {args.dim} train, {args.n_val} val, {args.n_classes} classes, {args.n_concepts} "
          f"concepts, {len(SPARSITY_GRID)} ratios + standard probe, {args.epochs} epochs, batch {args.batch_size}, "
          f"lr {args.lr} x0.99/epoch, {args.seeds} seed(s) (ours), on {device}")
    print(f"hardware: {hardware()}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results, times = {}, {}
    for prec in args.precision:
        name = f"ours, {prec} matmuls"
        with Timer() as t:
            results[name] = ours(x, y, xv, yv, concepts, args.n_classes, args.epochs, args.batch_size, args.lr,
                                 getattr(torch, args.feature_dtype), args.seeds, prec)
        times[name] = t.seconds
        print(f"{name}: {t.seconds:.1f} s ({t.seconds / args.epochs:.2f} s/epoch, all ratios + probe)")
    mine = list(results)
    if not args.skip_baseline:
        xn, yn, xvn, yvn, cn = (a.cpu().numpy() for a in (x, y, xv, yv, concepts))
        for name, workers in (("original, 0 workers", 0), ("original as shipped, 4 workers", 4)):
            if workers and args.skip_shipped:
                continue
            with Timer() as t:
                results[name] = original_loop.run(xn, yn, xvn, yvn, cn, args.n_classes, SPARSITY_GRID,
                                                  epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                                  workers=workers, device=device)
            times[name] = t.seconds
            print(f"{name}: {t.seconds:.1f} s")
    names = list(results)
    print(f"\n{'':>8}" + "".join(f"{n[:26]:>28}" for n in names))
    print(f"{'standard':>8}" + "".join(f"{results[n][0]:>28.2f}" for n in names))
    for i, r in enumerate(SPARSITY_GRID):
        print(f"{'s=' + format(r, 'g'):>8}" + "".join(f"{results[n][1][i]:>28.2f}" for n in names))
    scores = {n: iis(SPARSITY_GRID, results[n][1], results[n][0]) for n in names}
    print(f"{'IIS':>8}" + "".join(f"{scores[n]:>28.4f}" for n in names))
    print(f"{'seconds':>8}" + "".join(f"{times[n]:>28.1f}" for n in names))
    for m in mine:
        for n in names[len(mine):]:
            print(f"{m} against {n}: {times[n] / times[m]:.1f}x faster; IIS difference {scores[m] - scores[n]:+.4f}")


if __name__ == "__main__":
    main()
