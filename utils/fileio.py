"""Files published whole or not at all, and the hashes that key them.

A file is written to a sibling temp name and renamed into place (:func:`atomic_write_bytes`); a folder is built under a
temp name and renamed when complete (:class:`TempDir`, :func:`publish_dir`, :func:`replace_dir`). A folder whose files
are replaced one by one (a training run's) instead carries a manifest written last, naming each file's digest
(:func:`manifest`, :func:`check_manifest`). A killed run therefore leaves either the old output or the new one, never
half of one; its temp folders (``<name>.tmp-PID-HEX``, ``<name>.old-PID-HEX``) are removed by the next run of the same
output once PID is dead (:func:`remove_strays`). A full disk or an over-large file is one :class:`UserError` naming the
path being written and the bytes it needed (:func:`write_error`). :func:`key_hash` and :func:`file_digest` name what
determines an output.
"""
import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import uuid

from .errors import UserError


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


def tmp_name(path, kind="tmp"):
    """A sibling temp name for ``path``, unique to this process: ``<path>.<kind>-PID-HEX`` (what
    :func:`remove_strays` looks for)."""
    return f"{os.fspath(path).rstrip('/')}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


def remove_strays(path):
    """Remove the temp and half-replaced siblings (``<path>.tmp-PID-HEX``, ``<path>.old-PID-HEX``) a killed run of
    ``path`` left, unless process PID is still running. Returns the names removed."""
    path = os.fspath(path).rstrip("/")
    gone = []
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}$")
    for cand in glob.glob(glob.escape(path) + ".*-*-*"):
        m = pattern.match(os.path.basename(cand))
        if not m or _alive(int(m.group(1))):
            continue
        if os.path.isdir(cand) and not os.path.islink(cand):
            shutil.rmtree(cand, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(cand)
        gone.append(cand)
    return gone


def size_text(n):
    return f"{n:,} bytes" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def write_error(path, e, need=None):
    """A :class:`UserError` for an OSError raised while writing ``path``: a full disk (ENOSPC, EDQUOT) or a file-size
    limit (EFBIG) names the path, the bytes needed and the space left; anything else names the path and the cause."""
    where = os.path.dirname(os.path.abspath(path))
    needs = f" ({size_text(need)} needed" if need else " ("
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{size_text(shutil.disk_usage(where).free)} free"
        except OSError:
            free = "free space unknown"
        sep = ", " if need else ""
        return UserError(f"no space left writing {path}{needs}{sep}{free} on {where}); free some space or point "
                         f"the output elsewhere, then rerun the same command")
    if e.errno == errno.EFBIG:
        sep = ", " if need else ""
        return UserError(f"file too large writing {path}{needs}{sep}over the file-size limit: see `ulimit -f`); "
                         f"raise the limit, then rerun the same command")
    return UserError(f"cannot write {path} ({e.strerror or e})")


def check_space(path, need):
    """Refuse up front (one :func:`write_error` line) when the filesystem of ``path`` has less than ``need`` bytes
    free, so a memory-mapped or long write never starts on a disk it cannot finish on."""
    where = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if free < need:
        raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), need)


def atomic_write_bytes(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e, len(data)) from None
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


def check_schema(path, obj, understood, field="schema"):
    """``obj`` (a JSON file's parsed content) when it is an object whose ``field`` is one of ``understood``; else one
    :class:`UserError` naming the file, the version found and the versions this code reads."""
    found = obj.get(field) if isinstance(obj, dict) else None
    if found not in understood:
        what = "is not a JSON object" if not isinstance(obj, dict) else \
            (f"has no {field!r}" if field not in obj else f"has {field} {found!r}")
        raise UserError(f"{path} {what}; this version reads {field} {' or '.join(repr(u) for u in understood)}")
    return obj


# how a field problem names a JSON value's type: the file's words, not Python's
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def json_type(value_or_type):
    """"an object", "a list", "a string", "a number", "a boolean" or "null": how an error names a JSON value's type."""
    kind = value_or_type if isinstance(value_or_type, type) else type(value_or_type)
    return _JSON_NAMES.get(kind, kind.__name__)


MISSING = object()   # what lookup returns for a field that is not there (null is a value: None)


def lookup(obj, dotted):
    """``obj[a][b]...`` for ``dotted`` = "a.b...", or :data:`MISSING` where a step is not an object holding the key."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return MISSING
        obj = obj[part]
    return obj


def field_problem(obj, fields):
    """The first of ``fields`` ({dotted name: type or tuple of types}) that ``obj`` lacks or holds with another JSON
    type, said as "'info' is a list, expected an object" ("a.b" looks inside "a"); None when every field is right.
    A boolean is never a number. Every reader of a JSON file the project writes checks its fields through this, so a
    damaged file is described the same way wherever it is read."""
    for name, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = lookup(obj, name)
        if value is MISSING:
            return f"{name!r} is missing, expected {json_type(kinds[0])}"
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return f"{name!r} is {json_type(value)}, expected {json_type(kinds[0])}"
    return None


def manifest(folder, names):
    """{name: sha256 of the file's bytes} for the files ``names`` of ``folder``: what a folder's last-written file
    records so readers can tell a finished folder from one whose files come from different runs."""
    return {n: "sha256:" + file_digest(os.path.join(folder, n)) for n in names}


def check_manifest(folder, files):
    """The first problem of ``folder`` against ``files`` (a :func:`manifest`), as a short phrase, or None."""
    if not isinstance(files, dict) or not files:
        return "its manifest ('files') is missing or malformed"
    for name, digest in files.items():
        p = os.path.join(folder, str(name))
        if os.path.normpath(str(name)) != str(name) or os.path.isabs(str(name)) or str(name).startswith(".."):
            return f"its manifest names {name!r}, not a file of the folder"
        if not os.path.isfile(p):
            return f"{name} is missing"
        if "sha256:" + file_digest(p) != digest:
            return f"{name} is not the one its manifest records (a run was stopped while replacing it)"
    return None


def replace_dir(tmp, path):
    """Move a finished temp directory to ``path``, replacing whatever was there. A kill between the two renames leaves
    no ``path`` (its stage rebuilds it) and an ``.old-PID-HEX`` sibling that the next run removes."""
    path = os.fspath(path).rstrip("/")
    old = None
    if os.path.lexists(path):
        old = tmp_name(path, "old")
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
        remove_strays(self.path)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            replace_dir(self.tmp, self.path)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise write_error(exc.filename or self.path, exc) from None
        return False


@contextlib.contextmanager
def publish_dir(path, names=None):
    """``with publish_dir(path) as tmp:`` write a whole folder (a report, a library) into ``tmp``; on success it
    replaces ``path`` in one rename, on any exception it vanishes and ``path`` is left as it was. With ``names``
    (the files such a folder holds), an existing ``path`` holding anything else is refused, not replaced."""
    path = os.fspath(path).rstrip("/") or "/"
    if names is not None and os.path.isdir(path):
        other = sorted(set(os.listdir(path)) - set(names))
        if other:
            raise UserError(f"{path} holds {other[0]!r}{f' and {len(other) - 1} more' if len(other) > 1 else ''}, "
                            f"which is not one of its output's files ({', '.join(names)}); it is replaced whole, so "
                            f"give it a folder of its own")
    with TempDir(path) as tmp:
        yield tmp
