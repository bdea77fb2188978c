"""Files published whole or not at all, and the hashes that key them.

A file is written to a sibling temp name and renamed into place (:func:`atomic_write_bytes`); a folder is built under a
temp name and renamed when complete (:class:`TempDir`, :func:`replace_dir`). A killed run therefore leaves either the
old output or the new one, never half of one. :func:`key_hash` and :func:`file_digest` name what determines an output.
"""
import hashlib
import json
import os
import shutil
import uuid


def key_hash(key):
    """Stable short hash of a JSON-able dict."""
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path, chunk=1 << 20):
    """sha256 of a file's bytes (used to key on local checkpoints and element indexes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


def tmp_name(path):
    """A sibling temp name for ``path``, unique to this process (a killed run's leftovers match ``*.tmp-*``)."""
    return f"{os.fspath(path).rstrip('/')}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def atomic_torch_save(path, obj):
    import io

    import torch      # only the trainers save tensors; everything else here stays importable without torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path):
    with open(path) as f:
        return json.load(f)


def replace_dir(tmp, path):
    """Move a finished temp directory to ``path``, replacing whatever was there."""
    path = os.fspath(path).rstrip("/")
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


class TempDir:
    """A sibling temp directory that becomes ``path`` on success and vanishes on failure."""

    def __init__(self, path):
        self.path = os.fspath(path).rstrip("/")
        self.tmp = tmp_name(self.path)

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            replace_dir(self.tmp, self.path)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
