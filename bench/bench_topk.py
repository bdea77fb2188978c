"""Exact per-row top-k masks for K = 200 concepts, 8 heads (one k per sparsity ratio): which way is fastest here.

    python -m bench.bench_topk                    # CPU (and the GPU, when there is one)

Candidates: torch.topk + scatter per head (small side: the k largest or the K - k smallest), one stable argsort
turned into ranks for every head, one torch sort + threshold per row, NumPy's introselect (np.partition) + threshold
per head, NumPy's sort + threshold, and what the sweep uses: utils.masks.topk_mask (NumPy's sort on the CPU, over
torch's threads) and utils.masks.torch_masks (its GPU path: one torch sort, thresholds, ties by a running count).
Every candidate must give the same mask as the stable sort on tie-free data (a permutation of 0..199 per row); prints
ms per call of an (8, batch, 200) activation block.
"""
import argparse

import numpy as np
import torch

from bench.common import Timer, hardware
from utils.heads import SPARSITY_GRID
from utils.masks import n_keep, ranks, topk_mask, torch_masks


def by_topk(m, keep):
    out = []
    for h, k in enumerate(keep):
        n = m.shape[-1]
        if k >= n:
            out.append(torch.ones_like(m[h], dtype=torch.bool))
        elif k <= n // 2:
            out.append(torch.zeros_like(m[h], dtype=torch.bool).scatter_(-1, m[h].topk(k, -1).indices, True))
        else:
            small = m[h].topk(n - k, -1, largest=False).indices
            out.append(torch.ones_like(m[h], dtype=torch.bool).scatter_(-1, small, False))
    return torch.stack(out)


def by_ranks(m, keep):
    return ranks(m) < torch.as_tensor(keep, device=m.device).view(-1, 1, 1)


def by_sort_threshold(m, keep):
    s = m.sort(-1, descending=True).values
    return m >= s.gather(-1, (torch.as_tensor(keep, device=m.device) - 1).view(-1, 1, 1).expand(-1, m.shape[1], 1))


def by_partition(m, keep):
    a = m.cpu().numpy()
    n = a.shape[-1]
    return torch.from_numpy(np.stack([a[h] >= np.partition(a[h], n - k, axis=-1)[:, n - k:n - k + 1]
                                      for h, k in enumerate(keep)])).to(m.device)


def by_np_sort(m, keep):
    a = m.cpu().numpy()
    s = np.sort(a, axis=-1)
    n = a.shape[-1]
    return torch.from_numpy(np.stack([a[h] >= s[h][:, n - k:n - k + 1] for h, k in enumerate(keep)])).to(m.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    print(f"hardware: {hardware()}")
    keep = [n_keep(r, 200) for r in SPARSITY_GRID]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    methods = {"topk+scatter": by_topk, "argsort ranks": by_ranks, "sort+threshold": by_sort_threshold,
               "np.partition": by_partition, "np.sort": by_np_sort,
               "utils.masks.topk_mask": lambda m, k: topk_mask(m, k),
               "utils.masks.torch_masks": lambda m, k: torch_masks(m.abs(), k, "round")}
    for dev in devices:
        for b in args.batch:
            # a permutation per row: no ties, so every exact method must agree with the stable sort
            m = torch.rand(8 * b, 200, device=dev).argsort(-1).float().view(8, b, 200)
            truth = by_ranks(m, keep)
            line = []
            for name, f in methods.items():
                assert torch.equal(f(m, keep), truth), name
                f(m, keep)
                with Timer() as t:
                    for _ in range(args.repeats):
                        f(m, keep)
                line.append(f"{name} {1e3 * t.seconds / args.repeats:.2f}")
            print(f"{dev}, (8, {b}, 200) ms per mask: " + "; ".join(line))


if __name__ == "__main__":
    main()
