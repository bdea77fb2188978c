"""Head sweep throughput: our sweep (features resident, every ratio trained at once) against what the original code
does (a per-sample Dataset and DataLoader, one sparsity ratio at a time), on the same synthetic features.

    python -m bench.bench_heads                          # ~20k x 2048, 100 classes, 200 concepts, 8 ratios (CPU)
    python -m bench.bench_heads --imagenet               # 1.28M x 2048, 1000 classes: ours only (for a GPU)

Prints the hardware, both times, the speed-up and both IIS values (each from its own standard probe).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bench.common import Rows, Timer, hardware
from utils.heads import SPARSITY_GRID, LinearProbes, SparseConceptHeads, fit, n_keep
from utils.iis import iis


class OneHead(nn.Module):
    """One sparse prototype head, as the original builds it: a module per sparsity ratio."""

    def __init__(self, concepts, n_classes, ratio):
        super().__init__()
        self.register_buffer("concepts", F.normalize(concepts, dim=1))
        self.ln = nn.LayerNorm(len(concepts))
        self.fc = nn.Linear(len(concepts), n_classes)
        self.k = n_keep(ratio, len(concepts))

    def forward(self, x):
        a = self.ln(x @ self.concepts.T)
        mask = torch.zeros_like(a).scatter_(1, a.abs().topk(self.k, dim=1).indices, 1.0)
        return self.fc(a * mask)


def train_one(model, x, y, xv, yv, epochs, lr, device, workers):
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train = DataLoader(Rows(x, y), batch_size=256, shuffle=True, num_workers=workers)
    val = DataLoader(Rows(xv, yv), batch_size=256, num_workers=workers)
    best = 0.0
    for _ in range(epochs):
        model.train()
        for xb, yb in train:
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            hits = sum((model(xb.to(device)).argmax(1).cpu() == yb).sum().item() for xb, yb in val)
        best = max(best, 100.0 * hits / len(yv))
    return best


def synthetic(n_train, n_val, dim, n_classes, device, seed=0):
    """Classes as noisy centres, made on the device (the ImageNet shape is 10 GB in float32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g, device=device)

    def split(n):
        y = torch.randint(0, n_classes, (n,), generator=g, device=device)
        x = centres[y] + 2.0 * torch.randn(n, dim, generator=g, device=device)
        return x, y
    return split(n_train) + split(n_val)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", action="store_true", help="ImageNet shape: 1 281 167 x 2048, 1000 classes, "
                                                            "30 epochs, ours only")
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--n_val", type=int, default=5000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--n_classes", type=int, default=100)
    p.add_argument("--n_concepts", type=int, default=200)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=256, help="our batch size")
    p.add_argument("--feature_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers (the original used 4)")
    p.add_argument("--skip_baseline", action="store_true")
    args = p.parse_args()
    if args.imagenet:
        args.n_train, args.n_val, args.n_classes, args.epochs, args.skip_baseline = 1281167, 50000, 1000, 30, True
        args.batch_size = max(args.batch_size, 4096)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y, xv, yv = synthetic(args.n_train, args.n_val, args.dim, args.n_classes, device)
    concepts = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:args.n_concepts].to(device)]
    grid = list(SPARSITY_GRID)
    print(f"{args.n_train} x {args.dim} train, {args.n_val} val, {args.n_classes} classes, {args.n_concepts} "
          f"concepts, {len(grid)} ratios + standard probe, {args.epochs} epochs, one lr, on {device}")
    print(f"hardware: {hardware()}")

    dt = getattr(torch, args.feature_dtype)
    xd, xvd = x.to(dt), xv.to(dt)
    with Timer() as t_ours:
        std = fit(LinearProbes(args.dim, args.n_classes, 1).to(device), [args.lr], xd, y, xvd, yv, args.epochs,
                  args.batch_size, desc="ours: probe")["top1"][0]
        heads = SparseConceptHeads(concepts, args.n_classes, grid).to(device)
        accs = fit(heads, [args.lr] * len(grid), xd, y, xvd, yv, args.epochs, args.batch_size,
                   desc="ours: 8 heads")["top1"]
    ours_iis = iis(grid, accs, std)
    print(f"ours: {t_ours.seconds:.1f} s ({t_ours.seconds / args.epochs:.2f} s/epoch for all ratios + probe); "
          f"standard top-1 {std:.2f}, IIS {ours_iis:.4f}")
    if args.skip_baseline:
        return
    xn, yn, xvn, yvn = (a.cpu().numpy() for a in (x, y, xv, yv))
    with Timer() as t_base:
        b_std = train_one(nn.Linear(args.dim, args.n_classes), xn, yn, xvn, yvn, args.epochs, args.lr, device,
                          args.workers)
        b_accs = [train_one(OneHead(concepts, args.n_classes, r), xn, yn, xvn, yvn, args.epochs, args.lr, device,
                            args.workers) for r in grid]
    base_iis = iis(grid, b_accs, b_std)
    print(f"original-style: {t_base.seconds:.1f} s; standard top-1 {b_std:.2f}, IIS {base_iis:.4f}")
    print(f"{'ratio':>6} {'original':>9} {'ours':>7}")
    for r, a, b in zip(grid, b_accs, accs):
        print(f"{r:>6} {a:>9.2f} {b:>7.2f}")
    print(f"speed-up: {t_base.seconds / t_ours.seconds:.1f}x; IIS difference {abs(ours_iis - base_iis):.4f}")


if __name__ == "__main__":
    main()
