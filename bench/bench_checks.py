"""Cost of the input checks of utils/validate.py: on existing store entries, and on a synthetic block of rows
extrapolated to a full split (default: ImageNet train, 1 281 167 x 2048 float32, about 10.5 GB).

    python -m bench.bench_checks --entries outputs/features/fashion_mnist/efficientnet_lite0/train \
        outputs/features/fashion_mnist/efficientnet_lite0/val \
        outputs/features/fashion_mnist/efficientnet_lite0/elements_segments
    python -m bench.bench_checks --rows 50000 --dim 2048 --scale_to 1281167

For each: the structure check (every store read), the content check (finite features, labels, no empty split:
every trainer and explain.py), the digest computed at write time (in memory) and its re-check on request
(--verify: the file re-read and hashed). Each time is the best of --repeat runs. The synthetic block is written to a
temporary folder and read back from the page cache: a store read cold from disk adds the disk's read time (a 10.5 GB
split at 2 GB/s: about 5 s), which the trainer pays anyway when it loads the features.
"""
import argparse
import hashlib
import os
import shutil
import tempfile
import time

import numpy as np

from bench.common import hardware
from utils import store, validate


def best(f, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(path, repeat):
    """{check: seconds} for one entry."""
    arrays, meta = store.read(path)
    offsets = validate.check_structure(path, meta)
    loaded = {n: np.array(a) for n, a in arrays.items()}
    out = {"structure": best(lambda: store.read(path), repeat)}
    if "labels" in arrays:
        out["content"] = best(lambda: validate.check_split(path, arrays, meta), repeat)
    else:
        out["content"] = best(lambda: validate.check_finite(path, "features", arrays["features"]), repeat)
    out["digest at write"] = best(lambda: [validate.array_digest(a) for a in loaded.values()], repeat)
    out["verify"] = best(lambda: [validate.file_data_digest(os.path.join(path, f"{n}.npy"), o)
                                  for n, o in offsets.items()], repeat)
    out["bytes"] = sum(a.nbytes for a in loaded.values())
    return out


def show(name, m, scale=1.0):
    """One line of timings; ``scale`` multiplies those that grow with the rows (not the header-only structure)."""
    cells = "  ".join(f"{k} {m[k] * (1 if k == 'structure' else scale):8.4f} s"
                      for k in ("structure", "content", "digest at write", "verify"))
    print(f"{name:<60} {m['bytes'] * scale / 2**20:9.1f} MiB  {cells}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", nargs="*", default=[], help="store entries to time the checks on")
    p.add_argument("--rows", type=int, default=50000, help="rows of the synthetic block (0: none)")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension of the synthetic block")
    p.add_argument("--scale_to", type=int, default=1281167, help="rows to extrapolate the synthetic block to")
    p.add_argument("--repeat", type=int, default=3, help="runs per timing (the best is kept)")
    args = p.parse_args()
    print(hardware())
    mb = np.random.default_rng(0).standard_normal((1 << 24,), dtype=np.float32)
    for algo in ("sha256", "blake2b", "md5"):
        t = best(lambda: hashlib.new(algo, memoryview(mb).cast("B")), args.repeat)
        print(f"{algo:8s} {mb.nbytes / t / 1e9:5.2f} GB/s" + ("   <- the store's digest" if algo == validate.DIGEST
                                                              else ""))
    total = None
    for e in args.entries:
        m = measure(e, args.repeat)
        show(e, m)
        total = m if total is None else {k: total[k] + m[k] for k in m}
    if total is not None and len(args.entries) > 1:
        show("all entries", total)
    if args.rows:
        tmp = tempfile.mkdtemp(prefix="bench_checks-")
        try:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
            y = rng.integers(0, 1000, args.rows)
            path = os.path.join(tmp, "block")
            store.write(path, {"features": x, "labels": y, "indices": np.arange(args.rows)}, {"bench": 1},
                        {"classes": [str(c) for c in range(1000)]})
            del x
            m = measure(path, args.repeat)
            show(f"synthetic {args.rows} x {args.dim} float32", m)
            show(f"extrapolated to {args.scale_to} x {args.dim} float32", m, args.scale_to / args.rows)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
