"""Concept vectors from element embeddings."""
import os

import numpy as np
from PIL import Image

from .elements import is_background
from .errors import UserError

SELECTIONS = ("first", "random", "balanced")


def select_prototypes(element_labels, n, mode="balanced", seed=0):
    """Row indices of the element embeddings used as Prototype concepts.

    first    : the first ``n`` rows (what the original code did: with elements stored class by class, that is only
               the first few classes)
    random   : ``n`` rows drawn uniformly by ``seed``
    balanced : round-robin over classes (a seeded order within each class), so every class gives ~n / n_classes
    """
    labels = np.asarray(element_labels)
    total = len(labels)
    if total == 0:
        raise UserError("no element embeddings to make concepts from")
    if n is None or n <= 0 or n >= total:
        return np.arange(total)
    if mode == "first":
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if mode == "random":
        return np.sort(rng.choice(total, size=n, replace=False))
    if mode != "balanced":
        raise UserError(f"concept selection must be one of {SELECTIONS}, not {mode!r}")
    queues = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    chosen = []
    while len(chosen) < n:
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return np.sort(np.array(chosen))


def cluster_centres(embeddings, k, seed=0):
    """Cluster concepts: KMeans centres of the element embeddings, and for each centre its nearest element's row.

    Returns (centres (k, D) float32, nearest_rows (k,) int64). KMeans (k-means++, 4 restarts) is seeded.
    """
    from sklearn.cluster import KMeans
    x = np.asarray(embeddings, dtype=np.float32)
    if k > len(x):
        raise UserError(f"cannot make {k} cluster concepts from {len(x)} elements; lower --n_concepts")
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    centres = km.cluster_centers_.astype(np.float32)
    d = ((x[None, :, :] - centres[:, None, :]) ** 2).sum(-1) if len(x) * k < 5_000_000 else None
    if d is None:  # large pools: distance by blocks of centres to bound memory
        d = np.concatenate([((x[None] - c[:, None]) ** 2).sum(-1) for c in np.array_split(centres, max(1, k // 16))])
    return centres, d.argmin(1).astype(np.int64)


def background_rows(index):
    """Boolean (N,) over an element library's rows (``index``: its parsed index.json, ``root``: its folder): True
    where the element image is mostly background (utils/elements.is_background)."""
    return np.array([is_background(Image.open(os.path.join(index["root"], e["file"])).convert("RGB"))
                     for e in index["elements"]], dtype=bool)
