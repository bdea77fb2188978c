"""Checks that keep a damaged or poisoned store entry from ever reaching a score (docs/files.md, "What is checked").

Two kinds:

* **structure** (:func:`check_structure`, run by every :func:`utils.store.read`): each array meta.json lists has its
  ``<name>.npy``, a well-formed .npy header whose shape and dtype are the ones meta.json records, and exactly the file
  size they imply. It reads only the headers, so it costs nothing whatever the entry's size.
* **content**: the digest recorded at write time (:func:`check_digests`, on request: ``--verify`` or ``IIS_VERIFY=1``),
  finite features, labels in [0, n_classes), no empty split (:func:`check_split`). These stream over the memory map in
  blocks of about :data:`BLOCK_BYTES`, so a 10 GB entry is checked without being loaded.

Every failure is one :class:`~utils.errors.UserError` whose message starts with the entry's path.
"""
import hashlib
import json
import os
import shlex
from dataclasses import dataclass

import numpy as np
import numpy.lib.format as npy_format

from .errors import UserError
from .fileio import field_problem, lookup, read_json

DIGEST = "sha256"            # hardware-accelerated on current x86 and ARM CPUs: faster here than blake2b (docs/benchmarks.md)
BLOCK_BYTES = 16 << 20       # rows per streamed block: about this many bytes
ENTRY_SCHEMA = 1             # meta.json's "schema" (utils/store.py)
LIBRARY_SCHEMA = 1           # an element library's index.json "schema" (utils/library.py)


def verify_requested(flag=None):
    """``flag`` if given, else the IIS_VERIFY environment variable (1/true/yes)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("IIS_VERIFY", "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class RebuildConfig:
    """The --force / --verify flags of every extractor and builder (utils/cli/flags.add_rebuild_args): ``force``
    rebuilds an output that looks finished (published whole, as any build); ``verify`` (None: IIS_VERIFY) also
    compares its inputs' content digest with the one recorded at build time and rebuilds on a mismatch."""
    force: bool = False
    verify: object = None

    @property
    def verifying(self):
        return verify_requested(self.verify)


# --------------------------------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------------------------------
def npy_header(path):
    """(shape, fortran_order, dtype, data offset) of a .npy file; ValueError with the reason when malformed."""
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
        except ValueError as e:
            raise ValueError(f"bad magic bytes ({one_line(e)})") from None
        try:
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, SyntaxError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"unreadable header ({one_line(e)})") from None
        return tuple(shape), bool(fortran), dtype, f.tell()


def one_line(e, limit=100):
    """An exception's message as one short printable line (numpy quotes a damaged header's raw bytes)."""
    msg = (str(e).splitlines() or [type(e).__name__])[0]
    if msg.startswith("Cannot parse header"):
        msg = "the header dictionary cannot be parsed"
    return msg.encode("ascii", "backslashreplace").decode()[:limit]


def _describe(shape, dtype):
    return f"{list(shape)} {dtype}"


def array_specs(entry, meta):
    """{name: (shape, dtype)} as meta.json records them; UserError when meta.json is not a store entry's."""
    arrays = meta.get("arrays") if isinstance(meta, dict) else None
    if not isinstance(arrays, dict) or not arrays:
        raise UserError(f"{entry}: meta.json lists no arrays; {damaged(entry)}")
    specs = {}
    for name, spec in arrays.items():
        try:
            shape, dtype = spec
            specs[name] = (tuple(int(s) for s in shape), np.dtype(dtype))
        except (TypeError, ValueError):
            raise UserError(f"{entry}: meta.json records array '{name}' as {spec!r}, not [shape, dtype]; "
                            f"{damaged(entry)}") from None
    return specs


def forced(recorded, force=True):
    """The shell command that rebuilds an output from ``recorded`` (the {"command", "cwd"} an output records: see
    utils/cli.command), with --force (``force``: a trainer has none, it retrains a damaged run by itself); None when
    nothing usable is recorded."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("command"), str) or not recorded["command"]:
        return None
    cmd = recorded["command"]
    try:
        has_force = "--force" in shlex.split(cmd)
    except ValueError:
        return None
    cmd = cmd if has_force or not force else f"{cmd} --force"
    cwd = recorded.get("cwd")
    return f"cd {shlex.quote(cwd)} && {cmd}" if isinstance(cwd, str) and cwd else cmd


def recorded_command(entry):
    """The command that built the store entry ``entry`` (its meta.json's ``info.command``), with --force, or None
    when meta.json is unreadable or records none (an entry written before commands were recorded)."""
    meta = _json_or_none(os.path.join(entry, "meta.json"))
    info = meta.get("info") if isinstance(meta, dict) else None
    return forced(info.get("command")) if isinstance(info, dict) else None


def _json_or_none(path):
    """The parsed JSON file at ``path``, or None when it cannot be read or parsed: where a recorded command is looked
    up for advice, a damaged file only means there is none to quote."""
    try:
        return read_json(path)
    except (OSError, ValueError):       # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def redo(entry):
    """How to rebuild ``entry``: the command that made it (recorded in its meta.json) again, with --force (a damaged
    entry can look current); the command's pattern when the entry records none."""
    cmd = recorded_command(entry)
    if cmd:
        return f"re-extract it: {cmd}"
    return (f"re-extract it: rerun the command that made {entry} with --force (dataset features: python -m "
            f"concept_extractor.dataset_feature_extractor ... --out {entry} --force)")


def damaged(entry):
    return f"the entry is damaged, {redo(entry)}"


def check_meta(entry, meta, schemas=(ENTRY_SCHEMA,)):
    """meta.json's own fields: a schema this code reads, ``key`` and ``info`` objects, ``key_hash`` a string and
    ``digests`` (when present) an object of "<algorithm>:<hex>" strings. One UserError naming the entry."""
    where = os.path.join(entry, "meta.json")
    if not isinstance(meta, dict):
        raise UserError(f"{where} is not a JSON object; {damaged(entry)}")
    if meta.get("schema") not in schemas:
        raise UserError(f"{where} has schema {meta.get('schema')!r}; this version reads schema "
                        f"{' or '.join(map(repr, schemas))}: {redo(entry)}")
    why = field_problem(meta, {"key": dict, "info": dict, "key_hash": str})
    if why:
        raise UserError(f"{where}: {why}; {damaged(entry)}")
    digests = meta.get("digests")
    if digests is not None and not (isinstance(digests, dict) and all(
            isinstance(v, str) and ":" in v for v in digests.values())):
        raise UserError(f"{where}: 'digests' is malformed (expected {{array: \"sha256:<hex>\"}}); {damaged(entry)}")
    return meta


def meta_field(entry, meta, dotted, kind=dict):
    """``meta[a][b]...`` for ``dotted`` = "a.b...", which must be a ``kind``; else one UserError naming the entry."""
    why = field_problem(meta, {dotted: kind})
    if why:
        raise UserError(f"{os.path.join(entry, 'meta.json')}: {why}; {damaged(entry)}")
    return lookup(meta, dotted)


def check_structure(entry, meta):
    """Check every array file of ``entry`` against ``meta`` (headers and sizes only). Returns {name: data offset}."""
    check_meta(entry, meta)
    offsets = {}
    for name, (shape, dtype) in array_specs(entry, meta).items():
        path = os.path.join(entry, f"{name}.npy")
        want = _describe(shape, dtype)
        if not os.path.isfile(path):
            raise UserError(f"{entry}: array '{name}': {name}.npy is missing (meta.json records {want})")
        try:
            found_shape, fortran, found_dtype, offset = npy_header(path)
        except ValueError as e:
            raise UserError(f"{entry}: array '{name}': {name}.npy is not a valid .npy file: {e}; "
                            f"expected {want}") from None
        if found_shape != shape or found_dtype != dtype:
            raise UserError(f"{entry}: array '{name}': expected {want} (meta.json), found "
                            f"{_describe(found_shape, found_dtype)} in {name}.npy")
        if fortran and len(shape) > 1:
            raise UserError(f"{entry}: array '{name}': {name}.npy is in Fortran order; the store writes C order")
        size, expect = os.path.getsize(path), offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size != expect:
            raise UserError(f"{entry}: array '{name}': {name}.npy is {size} bytes, expected {expect} for {want} "
                            f"({'truncated' if size < expect else 'trailing bytes'})")
        offsets[name] = offset
    return offsets


# --------------------------------------------------------------------------------------------------------------------
# digests
# --------------------------------------------------------------------------------------------------------------------
class Digest:
    """Running digest of an array's C-order data bytes, fed block by block (rows in order)."""

    def __init__(self):
        self.h = hashlib.new(DIGEST)

    def update(self, block):
        block = np.ascontiguousarray(block)
        if block.size:
            self.h.update(memoryview(block.reshape(-1)).cast("B"))
        return self

    def value(self):
        return f"{DIGEST}:{self.h.hexdigest()}"


def array_digest(a):
    """Digest of a whole array, streamed in blocks (works on memory maps)."""
    d = Digest()
    for _, block in blocks(a):
        d.update(block)
    return d.value()


def file_data_digest(path, offset, algorithm=DIGEST, chunk=BLOCK_BYTES):
    """Digest of a .npy file's data bytes (everything after the header), read in chunks."""
    h = hashlib.new(algorithm)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return f"{algorithm}:{h.hexdigest()}"


def check_digests(entry, meta, offsets):
    """Re-hash every array of ``entry`` and compare with the digests meta.json recorded at write time. Returns the
    names that had none (entries written before digests were recorded)."""
    recorded = meta.get("digests") or {}
    unrecorded = []
    for name, offset in offsets.items():
        want = recorded.get(name)
        if not want:
            unrecorded.append(name)
            continue
        algorithm = want.split(":", 1)[0]
        if algorithm not in hashlib.algorithms_available:
            raise UserError(f"{entry}: array '{name}': digest algorithm {algorithm!r} in meta.json is unknown")
        found = file_data_digest(os.path.join(entry, f"{name}.npy"), offset, algorithm)
        if found != want:
            raise UserError(f"{entry}: array '{name}': content digest {found[:24]}... differs from the "
                            f"{want[:24]}... recorded when it was written (its bytes changed); {redo(entry)}")
    return unrecorded


# --------------------------------------------------------------------------------------------------------------------
# content
# --------------------------------------------------------------------------------------------------------------------
def blocks(a, block_bytes=None):
    """(first row, rows) blocks of ``a`` of about ``block_bytes`` (default :data:`BLOCK_BYTES`) each; slices of a
    memory map stay mapped, so only one block at a time is read."""
    block_bytes = block_bytes or BLOCK_BYTES
    n = len(a) if a.ndim else 1
    row_bytes = max(1, a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))
    step = max(1, block_bytes // row_bytes)
    if a.ndim == 0:
        yield 0, a.reshape(1)
        return
    for i in range(0, n, step):
        yield i, a[i:i + step]


def check_finite(entry, name, a):
    """Refuse the first row of ``a`` holding NaN or +-Inf. min/max propagate NaN and show Inf, so a clean block costs
    two vectorised reductions and no temporary array."""
    if not np.issubdtype(a.dtype, np.floating):
        return
    for start, block in blocks(a):
        if block.size == 0 or (np.isfinite(block.min()) and np.isfinite(block.max())):
            continue
        bad = ~np.isfinite(block)
        flat = bad.reshape(len(block), -1)
        r = int(np.flatnonzero(flat.any(axis=1))[0])
        c = int(np.flatnonzero(flat[r])[0])
        value = block.reshape(len(block), -1)[r, c]
        where = f"row {start + r}" + (f", column {c}" if block.ndim > 1 else "")
        raise UserError(f"{entry}: array '{name}' {where} is {value}, the first non-finite value ({len(a)} rows); "
                        f"{redo(entry)}")


def check_labels(entry, name, labels, n_classes, what=None):
    """Refuse the first label outside [0, n_classes) (and non-integer label arrays); ``what`` says where n_classes
    comes from (default: the entry's class list)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{entry}: array '{name}' is {labels.dtype}, labels must be integers")
    for start, block in blocks(labels):
        if block.size == 0 or (block.min() >= 0 and block.max() < n_classes):
            continue
        r = int(np.flatnonzero((block < 0) | (block >= n_classes))[0])
        raise UserError(f"{entry}: array '{name}' row {start + r} is {int(block[r])}, outside [0, {n_classes}) "
                        f"({what or f'meta.json lists {n_classes} classes'})")


def n_classes_of(entry, meta):
    classes = (meta.get("info") or {}).get("classes")
    if not isinstance(classes, list) or not classes:
        raise UserError(f"{entry}: meta.json records no class list (info.classes); its labels cannot be checked")
    return len(classes)


def check_split(entry, arrays, meta, dim=None, dim_of="the train features"):
    """An entry's features and labels as training and explanations use them: both present, 2-D features with one
    integer label per row, at least one row, ``dim`` columns when given, every value finite, every label in
    [0, n_classes) of the entry's class list."""
    require_arrays(entry, arrays, ("features", "labels"))
    features, labels = arrays["features"], arrays["labels"]
    if features.ndim != 2:
        raise UserError(f"{entry}: array 'features' has shape {list(features.shape)}, expected (rows, dim)")
    if labels.ndim != 1 or len(features) != len(labels):
        raise UserError(f"{entry}: {features.shape[0]} feature rows but {len(labels)} labels")
    if len(features) == 0:
        raise UserError(f"{entry}: the split is empty (0 rows); nothing to train on or explain")
    if dim is not None and features.shape[1] != dim:
        raise UserError(f"{entry}: features are {features.shape[1]}-d, expected {dim}-d like {dim_of} "
                        f"(another backbone or layer?)")
    check_labels(entry, "labels", labels, n_classes_of(entry, meta))
    check_finite(entry, "features", features)


def require_arrays(entry, arrays, names):
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(f"{entry}: meta.json lists no {', '.join(repr(n) for n in missing)} array "
                        f"(it has {', '.join(sorted(arrays))}); is this the right entry?")


# --------------------------------------------------------------------------------------------------------------------
# element library index (input of visual_element_emb_extractor)
# --------------------------------------------------------------------------------------------------------------------
def inside(root, rel):
    """True when ``rel`` is a normalised relative path that stays inside ``root`` (symbolic links resolved)."""
    if not rel or os.path.isabs(rel) or os.path.normpath(rel) != rel or rel.split(os.sep)[0] == "..":
        return False
    real_root = os.path.realpath(root)
    return os.path.realpath(os.path.join(root, rel)).startswith(real_root + os.sep)


def rebuild_library(index_path):
    """How to rebuild the element library of ``index_path``: the command recorded in its index.json (or, when that is
    unreadable, in the manifest.json its build wrote first), with --force."""
    for name in ("index.json", "manifest.json"):
        d = _json_or_none(os.path.join(os.path.dirname(index_path), name))
        cmd = forced(d.get("command")) if isinstance(d, dict) else None
        if cmd:
            return f"rebuild the element library: {cmd}"
    return "rebuild the element library (rerun segment_extractor or patch_extractor with --force)"


def check_element_index(index_path):
    """The parsed index.json of an element library, after checking that it is valid JSON with a class list and at
    least one element, and that every element's file exists and its label is in [0, n_classes)."""
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{index_path} is not valid JSON ({one_line(e)}); {rebuild_library(index_path)}") from None
    if isinstance(index, dict) and index.get("schema") not in (LIBRARY_SCHEMA,):
        raise UserError(f"{index_path} has schema {index.get('schema')!r}; this version reads schema "
                        f"{LIBRARY_SCHEMA!r}: {rebuild_library(index_path)}")
    classes = index.get("classes") if isinstance(index, dict) else None
    elements = index.get("elements") if isinstance(index, dict) else None
    if not isinstance(classes, list) or not classes or not isinstance(elements, list):
        raise UserError(f"{index_path} has no class list or no element list; {rebuild_library(index_path)}")
    if not elements:
        raise UserError(f"{index_path} lists no elements")
    root, n = os.path.dirname(index_path), len(classes)
    for i, e in enumerate(elements):
        label, file = (e.get("label"), e.get("file")) if isinstance(e, dict) else (None, None)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n:
            raise UserError(f"{index_path}: element {i} has label {label!r}, outside [0, {n}) ({n} classes)")
        if not isinstance(file, str) or not inside(root, file):
            raise UserError(f"{index_path}: element {i}: its path {file!r} is not a normalised relative path inside "
                            f"the library; refusing it: {rebuild_library(index_path)}")
        if not os.path.isfile(os.path.join(root, file)):
            raise UserError(f"{index_path}: element {i}: its image {file!r} is missing; {rebuild_library(index_path)}")
    return index
