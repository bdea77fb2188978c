"""Fits that depend on the features but not on the concepts, kept beside the train feature entry so that every run
on those features (a backbone's prototype, cluster and end2end runs; the text run) computes them once.

Two things a training run computes are functions of the features alone: the converged standard probe of each split
(utils/probe.py) and the random-concept floor of a K (utils/floor.py). Each is kept as a store entry (utils/store.py:
arrays + meta.json, built aside and renamed into place, so a killed run leaves the old entry or the new one)::

    <train entry>.fits/probe_<key hash>/    one probe fit (one split's rows)
    <train entry>.fits/floor_<key hash>/    one floor (its draws' results rows and val predictions)

keyed by everything that determines it: the train and val entries' keys and array digests, how the features are
placed (dtype, device kind), the rows of the split, and the probe's or the floor's settings. An entry is used only
when its key matches and its arrays' bytes match their recorded digests; anything else (a damaged, half-written or
foreign entry) is said and recomputed, never trusted. The cache is an optimisation: a run whose cache cannot be
written (a read-only feature store) computes as before and says so.
"""
import os

import numpy as np

from . import store, validate
from .errors import UserError
from .fileio import key_hash, remove_strays

SCHEMA = "iis.fit/1"


def entry_key(meta):
    """What identifies a store entry's contents: its key hash and its arrays' recorded digests."""
    return {"key_hash": meta.get("key_hash"), "digests": meta.get("digests")}


def rows_digest(idx):
    """Digest of a row-index tensor or array (None stays None): which rows a fit used."""
    if idx is None:
        return None
    return validate.array_digest(np.asarray(idx.cpu() if hasattr(idx, "cpu") else idx, dtype=np.int64))


def placement(x):
    """How a feature array reaches a fit, which gives the fit its values: a resident tensor's dtype, or a streamed
    memory map's."""
    return f"tensor {x.dtype}" if type(x).__module__.startswith("torch") else f"array {np.dtype(x.dtype)}"


class FitCache:
    """The fits of one train/val pair of feature entries, under ``<train entry>.fits/``; ``base`` is what every fit
    there shares (the entries' identities, the features' placement, the device kind)."""

    def __init__(self, train_entry, base):
        self.root = os.fspath(train_entry).rstrip("/") + ".fits"
        self.base = dict(base, schema=SCHEMA)

    def _where(self, kind, key):
        full = dict(self.base, kind=kind, **key)
        return os.path.join(self.root, f"{kind}_{key_hash(full)}"), full

    def load(self, kind, key):
        """(arrays, info) of the fit of ``kind`` and ``key``, or None when there is none or it is not sound."""
        path, full = self._where(kind, key)
        remove_strays(path)         # what a run killed while publishing it left
        if not os.path.isdir(path):
            return None
        meta = store.read_meta(path)
        if meta is None or meta.get("key_hash") != key_hash(full):
            print(f"{path}: not the {kind} fit its name says (damaged or foreign): recomputing it")
            return None
        try:
            arrays, meta = store.read(path, mmap=False, verify=True)
        except UserError as e:
            print(f"{e}: recomputing it")
            return None
        print(f"{kind} fit reused from {path}")
        return arrays, meta["info"]

    def save(self, kind, key, arrays, info):
        path, full = self._where(kind, key)
        try:
            store.write(path, arrays, full, info)
        except (UserError, OSError) as e:
            print(f"note: the {kind} fit could not be kept for other runs ({e}); this run is unaffected")
