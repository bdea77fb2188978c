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
from .fileio import TempDir, atomic_write_bytes, check_space, key_hash, read_json, remove_strays, write_error

SCHEMA = validate.ENTRY_SCHEMA


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
    remove_strays(path)
    meta = read_meta(path)
    if not (bool(meta) and meta.get("schema") == SCHEMA and meta.get("key_hash") == key_hash(key)):
        if meta and isinstance(meta.get("key"), dict):
            now = json.loads(json.dumps(key, default=str))      # as meta.json holds it (tuples as lists)
            print(f"{path} was made from other inputs ({', '.join(changed(meta['key'], now)) or 'its key'} "
                  f"changed): rebuilding it")
        return False
    try:
        validate.check_structure(path, meta)
    except UserError as e:
        print(f"{e}; rebuilding it")
        return False
    return True


def content_unchanged(out, content):
    """False (and says why) when ``content`` (the inputs' content digest, computed on --verify) differs from the one
    the entry ``out`` recorded when it was extracted."""
    recorded = (read_meta(out) or {}).get("info", {}).get("content_digest")
    if recorded is None:
        print(f"warning: {out} records no content digest of its images (extracted before they were kept); "
              f"names, sizes and modification times checked, bytes not")
        return True
    if recorded != content():
        print(f"{out}: its images' bytes changed since it was extracted (its key did not change: found by "
              f"--verify): re-extracting it")
        return False
    return True


def changed(old, new, prefix=""):
    """The dotted names of the fields that differ between two keys (``data.files``: an input file's size or
    modification time, or the file list)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _meta(key, specs, info, digests):
    """meta.json of an entry whose arrays have ``specs`` {name: (shape, dtype)}."""
    return {"schema": SCHEMA, "key": key, "key_hash": key_hash(key),
            "arrays": {n: [list(shape), str(np.dtype(dt))] for n, (shape, dt) in specs.items()}, "info": info or {},
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
            json.dump(_meta(key, {n: (a.shape, a.dtype) for n, a in arrays.items()}, info, digests), f, indent=1, default=str)
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
        raise UserError(f"{path}: meta.json is not valid JSON ({validate.one_line(e)}); "
                        f"{validate.damaged(path)}") from None
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
    try:
        atomic_write_bytes(os.path.join(partial, f"chunk_{c:06d}.npz"), buf.getvalue())
    except UserError:
        if not os.listdir(partial):     # nothing to resume from: leave no empty folder behind
            os.rmdir(partial)
        raise


def chunk_array(partial, c, name):
    """Array ``name`` of chunk ``c`` (empty when the chunk does not hold it: a side array written after it was)."""
    with np.load(os.path.join(partial, f"chunk_{c:06d}.npz")) as z:
        return z[name] if name in z.files else np.zeros(0, np.int64)


def _npy_header(dtype, shape):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def merge_chunks(partial, path, n_chunks, key, info=None, extra=None, side=()):
    """Concatenate chunks 0..n_chunks-1 of ``partial`` into the entry ``path`` (streamed chunk by chunk, so the
    result may exceed RAM), add ``extra`` arrays, write meta last, and remove the partial folder. Arrays named in
    ``side`` (the chunk's bookkeeping, e.g. its skipped rows) are not part of the entry.

    The free space is checked first and the arrays are written with plain file writes (a memory-mapped write to a
    full disk is a SIGBUS, not an error): a full disk is one error line naming the file and the bytes needed, and the
    half-built entry is removed (the chunks stay, so the rerun after freeing space only merges)."""
    first = np.load(os.path.join(partial, "chunk_000000.npz"))
    names = [n for n in first.files if n not in side]
    sizes = [len(np.load(os.path.join(partial, f"chunk_{c:06d}.npz"))[names[0]]) for c in range(n_chunks)]
    shapes = {n: (sum(sizes),) + first[n].shape[1:] for n in names}
    need = sum(int(np.prod(shapes[n])) * first[n].dtype.itemsize for n in names) + \
        sum(np.asarray(a).nbytes for a in (extra or {}).values())
    check_space(path, need)
    with TempDir(path) as tmp:
        files = {n: os.path.join(tmp, f"{n}.npy") for n in names}
        outs = {n: open(files[n], "wb") for n in names}
        try:
            for n in names:
                outs[n].write(_npy_header(first[n].dtype, shapes[n]))
            hashes = {n: validate.Digest() for n in names}   # hashed as copied: no second pass over the data
            for c in range(n_chunks):
                chunk = np.load(os.path.join(partial, f"chunk_{c:06d}.npz"))
                for n in names:
                    block = np.ascontiguousarray(chunk[n], dtype=first[n].dtype)
                    outs[n].write(memoryview(block.reshape(-1)).cast("B") if block.size else b"")
                    hashes[n].update(block)
            for f in outs.values():
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_error(getattr(e, "filename", None) or path, e, need) from None
        finally:
            for f in outs.values():
                f.close()
        specs = {n: (shapes[n], first[n].dtype) for n in names}
        digests = {n: h.value() for n, h in hashes.items()}
        for n, a in (extra or {}).items():
            a = np.ascontiguousarray(a)
            np.save(os.path.join(tmp, f"{n}.npy"), a)
            specs[n], digests[n] = (a.shape, a.dtype), validate.array_digest(a)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(_meta(key, specs, info, digests), f, indent=1, default=str)
    shutil.rmtree(partial, ignore_errors=True)
    return path
