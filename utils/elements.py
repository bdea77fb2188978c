"""Visual elements cut from one image: SLIC superpixel segments at several scales, or grid patches.

Pure functions on arrays: an RGB uint8 image (H, W, 3) in, a list of :class:`Element` out.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

SLIC_SCALES = (10, 20, 30)
FILL = 117  # grey value outside the mask: ImageNet's mean pixel, so the fill carries as little signal as possible


@dataclass
class Element:
    image: Image.Image   # the element, resized to the output size
    method: str          # 'segment' or 'patch'
    scale: int           # SLIC n_segments, or the grid size
    box: tuple           # (top, left, bottom, right), inclusive, in the (resized) source image's pixels
    area: float          # fraction of the source image the mask covers


def slic_label_maps(img, scales=SLIC_SCALES, compactness=10.0, sigma=1.0):
    """One SLIC label map per scale (n_segments)."""
    from skimage.segmentation import slic
    return [slic(img, n_segments=n, compactness=compactness, sigma=sigma, start_label=0, channel_axis=-1)
            for n in scales]


def select_masks(label_maps, max_per_scale=5, max_jaccard=0.5, min_area=0.001):
    """Choose the element masks from per-scale label maps.

    Every label of every map is a candidate. Within a scale, candidates are taken largest first (ties by label); a
    candidate is dropped if it covers less than ``min_area`` of the image or if its Jaccard overlap with any mask kept
    so far (this scale or an earlier one) exceeds ``max_jaccard``; at most ``max_per_scale`` are kept per scale.

    Returns a list of (scale_index, boolean mask).
    """
    kept = []
    for si, labels in enumerate(label_maps):
        ids, counts = np.unique(labels, return_counts=True)
        order = sorted(range(len(ids)), key=lambda j: (-counts[j], ids[j]))
        n_scale = 0
        for j in order:
            if n_scale == max_per_scale:
                break
            if counts[j] < min_area * labels.size:
                continue
            mask = labels == ids[j]
            if any(np.logical_and(mask, m).sum() / np.logical_or(mask, m).sum() > max_jaccard for _, m in kept):
                continue
            kept.append((si, mask))
            n_scale += 1
    return kept


def mask_box(mask):
    """(top, left, bottom, right) of a boolean mask, bottom/right inclusive."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def crop_masked(img, mask, fill=FILL):
    """The pixels of ``img`` under ``mask`` on a ``fill`` background, cropped to the mask's box (last row/column
    included)."""
    t, l, b, r = mask_box(mask)
    out = np.where(mask[..., None], img, np.uint8(fill)).astype(np.uint8)
    return out[t:b + 1, l:r + 1], (t, l, b, r)


def _resized(arr, size):
    return Image.fromarray(arr).resize((size, size), Image.BICUBIC)


def segments(img, scales=SLIC_SCALES, compactness=10.0, sigma=1.0, max_per_scale=5, max_jaccard=0.5,
             min_area=0.001, fill=FILL, out_size=224):
    """SLIC segment elements of an RGB uint8 image."""
    maps = slic_label_maps(img, scales, compactness, sigma)
    out = []
    for si, mask in select_masks(maps, max_per_scale, max_jaccard, min_area):
        arr, box = crop_masked(img, mask, fill)
        out.append(Element(_resized(arr, out_size), "segment", int(scales[si]), box, float(mask.mean())))
    return out


def grid_boxes(h, w, g):
    """Inclusive boxes of a g x g grid over an h x w image (edges spread so every pixel is in exactly one cell)."""
    ys, xs = np.linspace(0, h, g + 1).round().astype(int), np.linspace(0, w, g + 1).round().astype(int)
    return [(int(ys[i]), int(xs[j]), int(ys[i + 1] - 1), int(xs[j + 1] - 1)) for i in range(g) for j in range(g)]


def patches(img, grids=(2, 3), out_size=224):
    """Grid patch elements: the image cut into g x g cells for each g in ``grids``."""
    h, w = img.shape[:2]
    out = []
    for g in grids:
        for t, l, b, r in grid_boxes(h, w, g):
            if b < t or r < l:
                continue  # image smaller than the grid: an empty cell
            out.append(Element(_resized(img[t:b + 1, l:r + 1], out_size), "patch", int(g), (t, l, b, r),
                               (b - t + 1) * (r - l + 1) / (h * w)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The element library on disk
#
#   <out_dir>/<method>/manifest.json            key of the library being built (a different key wipes the folder)
#   <out_dir>/<method>/<class>/elements.json    {"rows": [...], "skipped": [[why, what], ...]} of that class;
#                                               present only once the class folder is complete
#   <out_dir>/<method>/<class>/*.png            element images
#   <out_dir>/<method>/index.json               every row, written last: {"schema", "key", "key_hash", "classes",
#                                               "elements": [{"file", "label", "class", "source", "source_size",
#                                               "method", "scale", "box": [top, left, bottom, right], "area"}],
#                                               "summary"}
# Each class folder is built under a temp name and renamed when complete, so a killed run resumes class by class.
# ---------------------------------------------------------------------------------------------------------------------
def class_folders(classes):
    """Unique, filesystem-safe folder names for class names."""
    from .data import safe_name
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
    import os

    from .data import safe_name
    c, i, folder, class_folder = task
    source, size = _JOB["source"], _JOB["image_size"]
    ident = source.ident(i)
    try:
        img = source.image(i)
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for corrupt / truncated files
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
                  min_side=8):
    """Cut elements from ``images_per_class`` seeded images of each class of ``source`` into ``out_dir/method``.

    ``cut`` maps an RGB uint8 array (image_size x image_size) to a list of :class:`Element`; it must be picklable
    when ``workers`` > 1. Unreadable images and images whose short side is below ``min_side`` pixels are skipped and
    counted. The result does not depend on ``workers``. Returns the index path.
    """
    import glob
    import multiprocessing
    import os
    import shutil

    from tqdm import tqdm

    from .data import per_class_indices
    from .store import _tmp_name, atomic_write_json, key_hash, read_json, replace_dir

    root = os.path.join(out_dir, method)
    index_path, manifest_path = os.path.join(root, "index.json"), os.path.join(root, "manifest.json")
    key = {"schema": 1, "data": source.key(), "method": method, "params": params, "min_side": min_side,
           "images_per_class": images_per_class, "seed": seed, "image_size": image_size}
    h = key_hash(key)
    if os.path.exists(index_path) and read_json(index_path).get("key_hash") == h:
        print(f"{index_path} is up to date")
        return index_path
    if os.path.exists(manifest_path) and read_json(manifest_path).get("key_hash") != h:
        print(f"{root} was built with other settings: rebuilding it")
        shutil.rmtree(root)
    atomic_write_json(manifest_path, {"key": key, "key_hash": h})
    for stale in glob.glob(os.path.join(root, "*.tmp-*")):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)

    folders = class_folders(source.classes)
    chosen = per_class_indices(source.targets, images_per_class, seed)
    done, tmp, tasks, resumed = {}, {}, [], 0
    for c, idxs in chosen.items():
        marker = os.path.join(root, folders[c], "elements.json")
        if os.path.exists(marker):
            done[c] = read_json(marker)
            resumed += 1
            continue
        tmp[c] = _tmp_name(os.path.join(root, folders[c]))
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
    atomic_write_json(index_path, {"schema": 1, "key": key, "key_hash": h, "classes": source.classes,
                                   "elements": rows, "summary": summary})
    print(f"{len(rows)} elements from {n_images - len(skipped)} images "
          f"({counts['unreadable']} unreadable and {counts['too small']} too small skipped; "
          f"{resumed} classes resumed) -> {index_path}")
    return index_path
