"""Element libraries on disk: visual elements cut from a few seeded images per class of a dataset (in parallel
processes, byte-for-byte the same for any number of them), resumable class by class, with an index of every element.

    <out_dir>/<method>/manifest.json            key of the library being built (an unfinished one with another key
                                                is started again; a finished one is never rebuilt in place)
    <out_dir>/<method>/<class>/elements.json    {"rows": [...], "skipped": [[why, what], ...]} of that class;
                                                present only once the class folder is complete
    <out_dir>/<method>/<class>/*.png            element images
    <out_dir>/<method>/index.json               every row, written last: {"schema", "key", "key_hash", "classes",
                                                "elements": [{"file", "label", "class", "source", "source_size",
                                                "method", "scale", "box": [top, left, bottom, right], "area"}],
                                                "summary"}

Each class folder is built under a temp name and renamed when complete, so a killed run resumes class by class. The
cutting itself (SLIC segments, grid patches) is utils/elements.py.
"""
import hashlib
import multiprocessing
import os
import shutil
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data import UNREADABLE, class_folder_source, get_source, per_class_indices, safe_name
from .errors import UserError
from .fileio import atomic_write_json, key_hash, read_json, remove_strays, replace_dir, tmp_name
from .validate import LIBRARY_SCHEMA, RebuildConfig, check_element_index


@dataclass(frozen=True)
class LibraryConfig:
    """Where a library's images come from and how they are chosen (the element extractors' flags of these names):
    ``images`` (a folder of class folders) or the train split of ``dataset`` under ``data_root``."""
    images: str
    dataset: str
    data_root: str
    images_per_class: int
    seed: int
    image_size: int
    min_side: int
    workers: int
    out_dir: str


def build(cfg, method, cut, params, rebuild=RebuildConfig(), command=None):
    """Build (or find up to date) the ``method`` library of ``cfg``'s images with ``cut`` (see :func:`build_library`).
    Returns the index path."""
    if cfg.images_per_class < 1 or cfg.workers < 1:
        raise UserError("--images_per_class and --workers must be at least 1")
    source = class_folder_source(cfg.images) if cfg.images else get_source(cfg.dataset, "train", cfg.data_root)
    return build_library(source, method, cut, params, cfg.out_dir, cfg.images_per_class, cfg.seed, cfg.image_size,
                         cfg.workers, cfg.min_side, rebuild, command)


def read_index(folder):
    """(index path, parsed index.json) of the element library ``folder``, checked (utils/validate.py)."""
    index_path = os.path.join(folder, "index.json")
    if not os.path.isfile(index_path):
        raise UserError(f"no element library at {folder} (no index.json): run concept_extractor.segment_extractor or "
                        f"patch_extractor first")
    return index_path, check_element_index(index_path)


def elements_digest(folder, index):
    """sha256 over the bytes of every element image ``index`` (a parsed index.json of the library ``folder``) lists,
    in order: what --verify compares for element embeddings (reads every element file)."""
    h = hashlib.sha256()
    for e in index["elements"]:
        with open(os.path.join(folder, e["file"]), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def chosen_digest(source, chosen):
    """sha256 over the bytes of the images a library is cut from (``chosen``: class -> indices), in order: what its
    --verify compares (reads those files only; a dataset held in memory: its raw files)."""
    encoded, whole = getattr(source, "encoded", None), getattr(source, "content_digest", None)
    h = hashlib.sha256()
    for c in sorted(chosen):
        for i in chosen[c]:
            try:
                blob = encoded(int(i)) if encoded else None
            except OSError:             # unreadable: skipped by the build, and so by the digest
                blob = b""
            if blob is None:
                return whole() if whole else None
            h.update(blob)
            h.update(b"\0")
    return "sha256:" + h.hexdigest()


def _key_hash_of(path):
    """The ``key_hash`` a library's JSON file records, or None when it is missing or damaged."""
    try:
        d = read_json(path)
    except (OSError, ValueError):
        return None
    return d.get("key_hash") if isinstance(d, dict) else None


def class_folders(classes):
    """Unique, filesystem-safe folder names for class names."""
    names, seen = [], set()
    for c, name in enumerate(classes):
        folder = safe_name(name)
        if folder in seen:
            folder = f"{folder}_{c}"
        seen.add(folder)
        names.append(folder)
    return names


_JOB = {}


def _start_job(source, cut, image_size, min_side):
    """Per-process state of an extraction (set once per worker instead of pickled with every image)."""
    _JOB.update(source=source, cut=cut, image_size=image_size, min_side=min_side)


def _cut_image(task):
    """Cut one image's elements into ``folder``; return (rows, None) or (None, why it was skipped)."""
    c, i, folder, class_folder = task
    source, size = _JOB["source"], _JOB["image_size"]
    ident = source.ident(i)
    try:
        img = source.image(i)
    except UNREADABLE as e:
        return None, ("unreadable", f"{ident}: {type(e).__name__}")
    if min(img.size) < _JOB["min_side"]:
        return None, ("too small", f"{ident}: {img.size[0]}x{img.size[1]}")
    arr = np.asarray(img.resize((size, size), Image.BICUBIC))
    stem, rows = safe_name(ident), []
    for k, el in enumerate(_JOB["cut"](arr)):
        name = f"{stem}_{el.method[0]}{el.scale}_{k}.png"
        el.image.save(os.path.join(folder, name), compress_level=1)  # fast zlib level: encoding was ~1/3 of the time
        rows.append({"file": f"{class_folder}/{name}", "label": c, "class": source.classes[c], "source": ident,
                     "source_size": list(img.size), "method": el.method, "scale": el.scale, "box": list(el.box),
                     "area": round(el.area, 6)})
    return rows, None


def build_library(source, method, cut, params, out_dir, images_per_class=10, seed=0, image_size=224, workers=1,
                  min_side=8, rebuild=RebuildConfig(), command=None):
    """Cut elements from ``images_per_class`` seeded images of each class of ``source`` into ``out_dir/method``.

    ``cut`` maps an RGB uint8 array (image_size x image_size) to a list of :class:`Element`; it must be picklable
    when ``workers`` > 1. Unreadable images and images whose short side is below ``min_side`` pixels are skipped and
    counted. The result does not depend on ``workers``. ``rebuild.force`` rebuilds a finished library (any key);
    ``rebuild.verifying`` also compares the source images' bytes with the digest the library recorded and rebuilds it
    on a mismatch. ``command`` (utils/cli.command) is recorded, for advice to rebuild it. Returns the index path.
    """
    root = os.path.join(out_dir, method)
    index_path, manifest_path = os.path.join(root, "index.json"), os.path.join(root, "manifest.json")
    key = {"schema": 1, "data": source.key(), "method": method, "params": params, "min_side": min_side,
           "images_per_class": images_per_class, "seed": seed, "image_size": image_size}
    h = key_hash(key)
    for p in (index_path, manifest_path):
        remove_strays(p)                  # temp files of a killed run
    chosen = per_class_indices(source.targets, images_per_class, seed)
    old, restart = _key_hash_of(index_path), rebuild.force
    if old == h:
        try:
            index = check_element_index(index_path)
            if rebuild.force:
                print(f"{index_path}: --force: rebuilding the library")
            elif rebuild.verifying and index.get("content_digest") not in (None, chosen_digest(source, chosen)):
                print(f"{root}: its source images' bytes changed since it was built (same names, sizes and "
                      f"modification times; found by --verify): rebuilding it")
                restart = True
            else:
                print(f"{index_path} is up to date")
                return index_path
        except UserError as e:
            print(f"{e}: rebuilding it")
    elif os.path.exists(index_path) and old is None:
        print(f"{index_path} is damaged (not a JSON object with a key_hash): rebuilding the library")
    elif os.path.exists(index_path) and rebuild.force:
        print(f"{root}: --force: replacing the finished library cut with other settings")
    elif os.path.exists(index_path):  # finished with another key: runs may point at it, so it is never rebuilt in place
        raise UserError(f"{root} holds a finished library cut from other images or with other settings; give another "
                        f"--out_dir (the runners key it by dataset, images per class and seed), or rerun with "
                        f"--force to replace it")
    if os.path.exists(index_path):     # the commit point goes first: a kill from here on leaves no library
        os.remove(index_path)
    if restart and os.path.isdir(root):       # --force / a failed --verify: no class folder is resumed
        shutil.rmtree(root)
    if os.path.exists(manifest_path) and _key_hash_of(manifest_path) != h:
        print(f"{root} is an unfinished library with other settings: starting it again")
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    atomic_write_json(manifest_path, {"key": key, "key_hash": h, "command": command})

    folders = class_folders(source.classes)
    done, tmp, tasks, resumed = {}, {}, [], 0
    for c, idxs in chosen.items():
        remove_strays(os.path.join(root, folders[c]))       # a killed run's temp class folders
        marker = os.path.join(root, folders[c], "elements.json")
        if os.path.exists(marker):
            try:
                done[c] = read_json(marker)
                resumed += 1
                continue
            except (OSError, ValueError):     # a damaged marker: the class is cut again
                shutil.rmtree(os.path.join(root, folders[c]))
        tmp[c] = tmp_name(os.path.join(root, folders[c]))
        os.makedirs(tmp[c])
        tasks += [(c, int(i), tmp[c], folders[c]) for i in idxs]

    pending = {c: {"rows": [], "skipped": []} for c in tmp}
    left = {c: len(chosen[c]) for c in tmp}
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            pool = multiprocessing.Pool(workers, _start_job, (source, cut, image_size, min_side))
            results = pool.imap(_cut_image, tasks, chunksize=1)
        else:
            _start_job(source, cut, image_size, min_side)
            results = map(_cut_image, tasks)
        for (c, *_), (rows, why) in tqdm(zip(tasks, results), total=len(tasks), desc=method, unit="img",
                                         dynamic_ncols=True):
            if why:
                pending[c]["skipped"].append(why)
            else:
                pending[c]["rows"] += rows
            left[c] -= 1
            if left[c] == 0:  # the class is complete: publish its folder
                atomic_write_json(os.path.join(tmp[c], "elements.json"), pending[c])
                replace_dir(tmp[c], os.path.join(root, folders[c]))
                done[c] = pending.pop(c)
    finally:
        if pool is not None:
            pool.terminate()
        for c in pending:
            shutil.rmtree(tmp[c], ignore_errors=True)
    rows = [r for c in sorted(done) for r in done[c]["rows"]]
    skipped = [s for c in sorted(done) for s in done[c]["skipped"]]
    n_images = int(sum(len(v) for v in chosen.values()))
    counts = {why: sum(1 for w, _ in skipped if w == why) for why in ("unreadable", "too small")}
    summary = {"images": n_images, "elements": len(rows), "skipped": len(skipped),
               "skipped_files": [f"{w}: {m}" for w, m in skipped][:1000], "classes_resumed": resumed,
               **{f"skipped_{w.replace(' ', '_')}": n for w, n in counts.items()}}
    atomic_write_json(index_path, {"schema": LIBRARY_SCHEMA, "key": key, "key_hash": h, "classes": source.classes,
                                   "elements": rows, "summary": summary, "content_digest": chosen_digest(source, chosen),
                                   "command": command})   # the library's commit point
    print(f"{len(rows)} elements from {n_images - len(skipped)} images "
          f"({counts['unreadable']} unreadable and {counts['too small']} too small skipped; "
          f"{resumed} classes resumed) -> {index_path}")
    return index_path
