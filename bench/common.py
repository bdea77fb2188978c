"""Shared bits of the benchmarks: hardware line, timing, synthetic features with planted class structure."""
import os
import platform
import time

import numpy as np
import torch
from torch.utils.data import Dataset


def hardware():
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    line = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name(0)}"
    return line


class Rows(Dataset):
    """The straightforward data path the baselines use: one Python call and one tensor per sample."""

    def __init__(self, x, y, with_index=False):
        self.x, self.y, self.with_index = x, y, with_index

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        item = (torch.as_tensor(self.x[i]), int(self.y[i]))
        return item + (i,) if self.with_index else item


class Timer:
    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t, self.c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t
        self.cpu = self._cpu() - self.c

    @staticmethod
    def _cpu():
        """CPU seconds of this process and of its finished children (e.g. DataLoader workers, once joined)."""
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def planted_features(n_train, n_val, dim, n_classes, seed=0, noise=1.0):
    """Features whose classes differ along a few random directions each (a stand-in for real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)).astype(np.float32) / np.sqrt(dim) * 4

    def split(n):
        y = rng.integers(0, n_classes, n)
        x = centres[y] + noise * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim) * 4
        return x.astype(np.float32), y.astype(np.int64)
    return split(n_train) + split(n_val)
