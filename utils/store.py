"""Keyed, atomic, memory-mappable storage for every stage's output.

A *store entry* is a directory::

    <path>/meta.json   {"schema": 1, "key": {...}, "key_hash": "...", "arrays": {name: [shape, dtype]}, "info": {...}}
    <path>/<name>.npy  one NumPy array per name (np.load(..., mmap_mode="r") maps it)

``key`` holds everything that determines the arrays (backbone, weights, layer, pooling, preprocessing, data, subset,
code schema). An entry is reused only when its key hash equals the one asked for, so a stale cache is never picked up.
Entries are built in a sibling temp directory and renamed into place, so a killed run leaves either the old entry or
the new one, never half of one (utils/fileio.py).

meta.json also records a digest of each array's data bytes (``"digests": {name: "sha256:<hex>"}``). Reading an entry
always checks its structure (each array file present, its .npy header, shape, dtype and size as meta.json records;
utils/validate.py); the digests are re-checked on request (``verify=True``: the ``--verify`` flag or IIS_VERIFY=1).
"""
import io
import json
import os
import shutil
import sys

import numpy as np

from . import validate
from .errors import UserError
from .fileio import TempDir, atomic_write_bytes, key_hash, read_json

SCHEMA = 1


def read_meta(path):
    """The entry's meta.json, or None when it is missing or not a JSON object."""
    try:
        meta = read_json(os.path.join(path, "meta.json"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_current(path, key):
    """True when ``path`` holds a finished, structurally sound entry made from exactly ``key`` (a damaged one is
    reported and counts as absent, so the stage rebuilds it)."""
    meta = read_meta(path)
    if not (bool(meta) and meta.get("schema") == SCHEMA and meta.get("key_hash") == key_hash(key)):
        return False
    try:
        validate.check_structure(path, meta)
    except UserError as e:
        print(f"{e}; rebuilding it")
        return False
    return True


def _meta(key, arrays, info, digests):
    return {"schema": SCHEMA, "key": key, "key_hash": key_hash(key),
            "arrays": {n: [list(a.shape), str(a.dtype)] for n, a in arrays.items()}, "info": info or {},
            "digests": digests}


def write(path, arrays, key, info=None):
    """Write ``arrays`` (name -> ndarray) with its ``key`` atomically to the entry directory ``path``."""
    with TempDir(path) as tmp:
        arrays = {n: np.ascontiguousarray(a) for n, a in arrays.items()}
        digests = {}
        for name, arr in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), arr)
            digests[name] = validate.array_digest(arr)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(_meta(key, arrays, info, digests), f, indent=1, default=str)
    return path


def read(path, mmap=True, verify=None):
    """Return ``(arrays, meta)`` of a finished entry; arrays are memory-mapped unless ``mmap=False``.

    The entry's structure is always checked (utils/validate.py); with ``verify`` (None: the IIS_VERIFY environment
    variable) every array's bytes are re-hashed and compared with the digest recorded at write time. Any failure is
    one UserError naming the entry, the array and what was expected and found."""
    try:
        meta = read_json(os.path.join(path, "meta.json"))
    except FileNotFoundError:
        raise UserError(f"{path} is not a finished store entry (no meta.json); run the stage that makes it first") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: meta.json is not valid JSON ({validate.one_line(e)}); the entry is "
                        f"damaged, re-extract it") from None
    except OSError as e:
        raise UserError(f"{path}: meta.json cannot be read ({e.strerror})") from None
    offsets = validate.check_structure(path, meta)
    if validate.verify_requested(verify):
        unrecorded = validate.check_digests(path, meta, offsets)
        if unrecorded:
            print(f"warning: {path}: no digest recorded for {', '.join(unrecorded)} (written before digests were); "
                  f"structure checked, bytes not verified", file=sys.stderr)
    arrays = {}
    for n in meta["arrays"]:
        try:
            arrays[n] = np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r" if mmap else None,
                                allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: array '{n}': {n}.npy cannot be opened ({validate.one_line(e)})") \
                from None
    return arrays, meta


# ---------------------------------------------------------------------------------------------------------------------
# Chunked, resumable writing (feature extraction): rows are written in fixed chunks to <path>.partial-<key hash>/,
# each chunk atomically; a restarted run skips finished chunks; the last step merges them into the entry.
# Several processes (torchrun ranks) may fill one partial folder, each its own chunks.
# ---------------------------------------------------------------------------------------------------------------------
def partial_dir(path, key):
    return f"{os.fspath(path).rstrip('/')}.partial-{key_hash(key)}"


def chunk_done(partial, c):
    return os.path.exists(os.path.join(partial, f"chunk_{c:06d}.npz"))


def write_chunk(partial, c, arrays):
    os.makedirs(partial, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(os.path.join(partial, f"chunk_{c:06d}.npz"), buf.getvalue())


def merge_chunks(partial, path, n_chunks, key, info=None, extra=None):
    """Concatenate chunks 0..n_chunks-1 of ``partial`` into the entry ``path`` (streamed through memory maps, so the
    result may exceed RAM), add ``extra`` arrays, write meta last, and remove the partial folder."""
    first = np.load(os.path.join(partial, "chunk_000000.npz"))
    names = list(first.files)
    sizes = [len(np.load(os.path.join(partial, f"chunk_{c:06d}.npz"))[names[0]]) for c in range(n_chunks)]
    with TempDir(path) as tmp:
        outs = {n: np.lib.format.open_memmap(os.path.join(tmp, f"{n}.npy"), mode="w+", dtype=first[n].dtype,
                                             shape=(sum(sizes),) + first[n].shape[1:]) for n in names}
        hashes = {n: validate.Digest() for n in names}   # hashed as copied: no second pass over the data
        row = 0
        for c, size in enumerate(sizes):
            chunk = np.load(os.path.join(partial, f"chunk_{c:06d}.npz"))
            for n in names:
                block = np.ascontiguousarray(chunk[n], dtype=outs[n].dtype)
                outs[n][row:row + size] = block
                hashes[n].update(block)
            row += size
        for a in outs.values():
            a.flush()
        arrays = {n: a for n, a in outs.items()}
        digests = {n: h.value() for n, h in hashes.items()}
        for n, a in (extra or {}).items():
            a = np.ascontiguousarray(a)
            np.save(os.path.join(tmp, f"{n}.npy"), a)
            arrays[n], digests[n] = a, validate.array_digest(a)
        meta = _meta(key, arrays, info, digests)
        del outs, arrays
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
    shutil.rmtree(partial, ignore_errors=True)
    return path
